"""``python -m livetalk_core``: the command line of every model family, and its subcommands (see cli.py)."""

from .interrupts import exit_process, exit_quietly_while_starting

exit_quietly_while_starting()  # Ctrl-C while torch imports: one line, no traceback (see interrupts.py)

from .cli import main  # noqa: E402  (imported after the Ctrl-C handler on purpose)

exit_process(main())

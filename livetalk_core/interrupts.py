"""Ctrl-C in the command line: one line that says what was kept, exit status 130, never a traceback.

Importing torch takes seconds, and a KeyboardInterrupt raised inside an import can only end in a
traceback. So the CLI's entry point calls :func:`exit_quietly_while_starting` before its heavy
imports (only this light module is imported first): until :func:`ready` is called, Ctrl-C prints
the line and ends the process at once (nothing has been written yet). From then on Ctrl-C raises
KeyboardInterrupt (:func:`interrupt_handler`); the video writer holds it back while it encodes and
notes on it what it kept, and :func:`summary` turns those notes into the line. Nothing here is used
inside ComfyUI.

Python runs a signal's handler at the next bytecode of the main thread, which may be a ``__del__``
or a weakref callback that the garbage collector started (the ``regex`` package's objects have one):
a KeyboardInterrupt raised there is printed as "Exception ignored" and dropped, and the run went on
to the end. So the handler also remembers the Ctrl-C, such a dropped one is not printed
(:func:`_quiet_unraisable`), and :func:`raise_if_interrupted` raises it again at the run's next step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

INTERRUPTED_EXIT_CODE = 130
NOTHING_GENERATED = "nothing was generated yet; no file was written."


def summary(interrupt: BaseException) -> str:
    """The one line for an interrupted run: what the video writer kept (its notes), or that nothing was."""
    notes = " ".join(getattr(interrupt, "__notes__", []))
    return f"interrupted: {notes or NOTHING_GENERATED}"


def _exit_at_once(signum: int, frame: object) -> None:
    sys.stderr.write(f"\ninterrupted while starting: {NOTHING_GENERATED}\n")
    sys.stderr.flush()
    os._exit(INTERRUPTED_EXIT_CODE)  # no Python code (an import half done) gets to print a traceback


def exit_quietly_while_starting() -> None:
    """Until :func:`ready`, Ctrl-C ends the process with one line. A process started with Ctrl-C
    ignored (a background job) keeps ignoring it."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _exit_at_once)


_received = threading.Event()


def interrupt_handler(signum: int, frame: object) -> None:
    """Ctrl-C once the run has started: KeyboardInterrupt, remembered (module doc)."""
    _received.set()
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise the Ctrl-C that arrived and was dropped (raised inside a ``__del__``), if one did."""
    if _received.is_set():
        raise KeyboardInterrupt


def _quiet_unraisable(unraisable, default_hook=sys.unraisablehook) -> None:
    """A KeyboardInterrupt that Python had to drop is not printed (it is raised again at the next
    step); anything else is reported as Python does."""
    if unraisable.exc_type is KeyboardInterrupt and _received.is_set():
        return
    default_hook(unraisable)


def ready() -> None:
    """The imports are done: Ctrl-C raises KeyboardInterrupt again, for the run to report. A run
    starts with no Ctrl-C remembered (a caller may run the CLI more than once in one process)."""
    _received.clear()
    if signal.getsignal(signal.SIGINT) is _exit_at_once:
        signal.signal(signal.SIGINT, interrupt_handler)
        sys.unraisablehook = _quiet_unraisable


def exit_process(code: int) -> None:
    """End the CLI process with ``code``; a Ctrl-C during interpreter shutdown is ignored (it could
    only print a traceback from some cleanup code). After an interrupt the run has already closed its
    files, so the process ends at once: the interpreter's shutdown (threads joined, signal handlers
    reset to the default) could otherwise end it by the signal instead of with 130."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if code == INTERRUPTED_EXIT_CODE:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

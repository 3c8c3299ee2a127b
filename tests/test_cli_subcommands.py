"""``python -m livetalk_core <word> ...``: a first word in ``cli.SUBCOMMANDS`` runs that module's
``main`` with the rest of the arguments (the module imported only then); a module that is not part of
the installation is one ``error:`` line and exit status 2; any other first word is the video CLI's."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from livetalk_core import cli


def test_the_live_subcommands_name_the_live_modules():
    resolved = {word: importlib.util.resolve_name(module, "livetalk_core") for word, module in cli.SUBCOMMANDS.items()}
    assert resolved == {"live": "livetalk_core.live.server", "live-client": "livetalk_core.live.client"}


def test_a_subcommand_gets_the_rest_of_the_arguments(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_live_module.py").write_text(
        "def main(argv):\n    print('fake live got', argv)\n    return 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "live", "fake_live_module")
    assert cli.main(["live", "--port", "8765", "--smoke"]) == 7
    assert "fake live got ['--port', '8765', '--smoke']" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["livetalk", "live", "--help-me"])  # main() without argv reads sys.argv
    assert cli.main() == 7
    assert "fake live got ['--help-me']" in capsys.readouterr().out


def test_a_missing_subcommand_module_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "live-client", ".live.not_built_yet")
    assert cli.main(["live-client", "ws://x"]) == 2
    err = capsys.readouterr().err
    assert err == "error: 'live-client' is not available in this installation (livetalk_core.live.not_built_yet " \
                  "is missing).\n"


def test_a_module_that_fails_inside_is_not_hidden(tmp_path, monkeypatch):
    """Only the subcommand's own module being absent is the one-line message; a missing import inside it is
    the real error."""
    (tmp_path / "broken_live_module.py").write_text("import a_package_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "live", "broken_live_module")
    with pytest.raises(ModuleNotFoundError, match="a_package_that_is_not_installed"):
        cli.main(["live"])


def test_other_words_are_the_video_clis(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["livee"])
    assert exit_.value.code == 2 and "unrecognized arguments: livee" in capsys.readouterr().err

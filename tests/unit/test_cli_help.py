"""``prx-run --help`` names every command with a one-line summary, so a new user can find them."""

from __future__ import annotations

import importlib.util
import re

import pytest

from prx_core.cli import COMMAND_TABLE, main

#: Written out by hand, independently of the table: the commands a user must be able to discover.
DOCUMENTED_COMMANDS = ("check", "plugins", "sample", "eval", "export", "precompute", "ablate", "report")


def _help_text(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


def _listed_commands(help_text: str) -> dict[str, str]:
    """``prx-run NAME  summary`` lines of the help's command list: name -> summary."""
    return dict(re.findall(r"^  prx-run (\S+) +(\S.*)$", help_text, flags=re.MULTILINE))


def test_help_lists_every_command_of_the_dispatch_table(capsys: pytest.CaptureFixture[str]) -> None:
    listed = _listed_commands(_help_text(capsys))
    missing = sorted(set(COMMAND_TABLE) - set(listed))
    assert not missing, f"prx-run --help does not list {missing}"


def test_help_lists_the_documented_commands_and_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    listed = _listed_commands(_help_text(capsys))
    assert set(DOCUMENTED_COMMANDS) <= set(listed)
    assert "train" in listed["RECIPE"]  # training is the command without a name


def test_each_summary_is_one_nonempty_line(capsys: pytest.CaptureFixture[str]) -> None:
    listed = _listed_commands(_help_text(capsys))
    for name in COMMAND_TABLE:
        summary = listed[name]
        assert summary.strip() and "\n" not in summary, name
        assert summary == COMMAND_TABLE[name][0], f"{name}: the help's summary is cut or wrapped"


def test_every_command_is_dispatched_to_something_that_exists() -> None:
    for name, (_, handler) in COMMAND_TABLE.items():
        if isinstance(handler, str):
            # Not imported: some command modules import torch, and this test must stay fast.
            assert importlib.util.find_spec(f"prx_core.commands.{handler}") is not None, name
        else:
            assert callable(handler), name


@pytest.mark.parametrize("command", sorted(COMMAND_TABLE))
def test_each_command_answers_its_own_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([command, "--help"])
    assert stopped.value.code == 0
    assert f"prx-run {command}" in capsys.readouterr().out


def test_a_mistyped_command_is_named_with_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chek", "recipes/"]) == 2
    assert "unknown command 'chek'; did you mean 'check'?" in capsys.readouterr().err

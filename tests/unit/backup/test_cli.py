"""The verb table: every verb parses, and its help comes from its module's docstring."""

from __future__ import annotations

import pytest

from services.backup import cli


def test_every_verb_takes_its_help_and_runner_from_its_module() -> None:
    top = cli.parser()
    for name, verb in cli.VERBS.items():
        args = top.parse_args([name])
        assert args.run == verb.run
        assert verb.__doc__ is not None
        assert verb.__doc__.strip()


def test_verb_options_reach_the_runner() -> None:
    args = cli.parser().parse_args(["restore", "--backup", "b1", "--force"])
    assert (args.verb, args.backup, args.force, args.target) == ("restore", "b1", True, None)
    assert cli.parser().parse_args(["prune", "--dry-run"]).dry_run is True


def test_an_unknown_verb_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.parser().parse_args(["explode"])
    assert exited.value.code == 2
    assert "invalid choice: 'explode'" in capsys.readouterr().err

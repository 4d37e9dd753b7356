"""The command line parses as documented and refuses out-of-range values."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.simulator.cli import build_parser, config_from_args, main


def test_defaults() -> None:
    config = config_from_args(build_parser().parse_args([]), tty=True)
    assert (config.agents, config.customers, config.environments_per_customer) == (20, 4, 2)
    assert config.edge_url == "https://127.0.0.1:18443"
    assert config.pki_dir == Path(".run/pki")
    assert config.duration_s is None
    assert (config.heartbeat_s, config.poll_wait_s, config.resources) == (5.0, 20.0, 3)
    assert config.live
    assert config.controller_metrics == ()


def test_options() -> None:
    args = build_parser().parse_args(
        [
            "--agents=7",
            "--duration=30",
            "--no-live",
            "--seed=4",
            "--fail-ratio=0.25",
            "--controller-metrics=http://127.0.0.1:6066/metrics",
            "--controller-metrics=http://127.0.0.1:6067/metrics",
            "--report=out/r.json",
        ]
    )
    config = config_from_args(args, tty=True)
    assert config.agents == 7
    assert config.duration_s == 30.0
    assert not config.live
    assert config.seed == 4
    assert config.fail_ratio == 0.25
    assert len(config.controller_metrics) == 2
    assert config.report == Path("out/r.json")


def test_no_live_screen_without_a_terminal() -> None:
    assert not config_from_args(build_parser().parse_args([]), tty=False).live


@pytest.mark.parametrize(
    "bad",
    [
        ["--agents=0"],
        ["--poll-wait-s=26"],
        ["--heartbeat-s=0"],
        ["--fail-ratio=1.5"],
        ["--duration=0"],
        ["--resources=1001"],
        ["--agents=many"],
        ["--poll-wait-s=2.5"],
    ],
)
def test_out_of_range_values_are_refused(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(bad)
    assert exit_info.value.code == 2


def test_help_needs_nothing_running(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--controller-metrics" in capsys.readouterr().out


def test_missing_pki_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--pki-dir", str(tmp_path), "--duration=1"]) == 1
    assert "root-ca.pem is missing" in capsys.readouterr().err

"""The make-run ownership view: /status bodies summarised per owner and shown."""

from __future__ import annotations

from typing import Any

import pytest

from bench.simulator.display import ownership_lines, progress_line, render
from bench.simulator.ownership import ownership_summary, partitions_by_owner
from bench.simulator.stats import Stats


def partition(number: int, owner: str | None, lag: int, rate: float) -> dict[str, Any]:
    return {"partition": number, "owner": owner, "epoch": 3, "lag": lag, "events_per_s": rate}


STATUS = {
    "topic": "fleetplane.events",
    "taken_at": "2026-11-27T12:00:00+00:00",
    "total_lag": 7,
    "partitions": [
        partition(0, "controller-2", 5, 1.5),
        partition(1, "controller-1", 0, 2.0),
        partition(2, "controller-2", 2, 0.25),
        partition(3, None, 0, 0.0),
    ],
}


def test_partitions_are_grouped_by_owner_with_their_lag_and_rate() -> None:
    summary = ownership_summary(STATUS)
    assert summary["owners"] == {
        "controller-1": {"partitions": [1], "lag": 0, "events_per_s": 2.0},
        "controller-2": {"partitions": [0, 2], "lag": 7, "events_per_s": 1.8},
    }
    assert summary["unowned"] == [3]
    assert summary["total_lag"] == 7
    assert partitions_by_owner(summary) == {"controller-1": [1], "controller-2": [0, 2]}


def test_a_body_that_is_not_a_status_report_is_refused() -> None:
    with pytest.raises(KeyError):
        ownership_summary({"error": "OperationalError: connection refused"})


def test_the_screen_shows_one_line_per_owner_and_the_unowned_partitions() -> None:
    lines = ownership_lines(ownership_summary(STATUS))
    assert lines[1] == "ownership (controllers' /status)   total lag 7"
    assert lines[2].split() == ["controller-1", "partitions", "1", "lag", "0", "2.0", "ev/s"]
    assert lines[3].split() == ["controller-2", "partitions", "0,2", "lag", "7", "1.8", "ev/s"]
    assert lines[4].strip() == "unowned partitions 3"


def test_without_a_status_url_nothing_about_ownership_is_shown() -> None:
    snapshot = Stats(0.0).snapshot(1.0, recent=True)
    assert snapshot["ownership"] is None
    assert not any("ownership" in line for line in render(snapshot, "sim"))
    assert "owners=" not in progress_line(snapshot)


def test_the_progress_line_counts_owners_and_lag() -> None:
    stats = Stats(0.0)
    stats.ownership = ownership_summary(STATUS)
    assert progress_line(stats.snapshot(1.0, recent=True)).endswith(" owners=2 lag=7")

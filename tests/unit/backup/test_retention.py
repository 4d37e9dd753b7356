"""Which backups a prune keeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.backup.retention import Backup, keep

START = datetime(2026, 11, 30, 0, 30, tzinfo=UTC)  # a Monday


def hourly(count: int, verified: frozenset[int] = frozenset()) -> list[Backup]:
    return [
        Backup(f"b{i:03d}", START + timedelta(hours=6 * i), i in verified) for i in range(count)
    ]


def test_keeps_the_newest_n() -> None:
    backups = hourly(10)
    assert keep(backups, last=3, daily=0, weekly=0) == {"b009", "b008", "b007"}


def test_keeps_the_newest_of_each_recent_day_and_week() -> None:
    # Four backups a day for 14 days: 2026-11-30 .. 2026-12-13 (ISO weeks 49 and 50).
    backups = hourly(56)
    kept = keep(backups, last=1, daily=3, weekly=2)
    # Newest overall; the newest of the last three days; the newest of each of two weeks.
    assert kept == {"b055", "b051", "b047", "b027"}


def test_never_deletes_the_newest_verified_backup() -> None:
    backups = hourly(10, verified=frozenset({2, 4}))
    assert keep(backups, last=2, daily=0, weekly=0) == {"b009", "b008", "b004"}


def test_an_empty_bucket_keeps_nothing() -> None:
    assert keep([], last=3, daily=3, weekly=3) == set()

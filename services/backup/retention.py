"""Retention: which backups a prune keeps. Pure logic, unit-tested without a bucket."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Backup:
    backup_id: str
    started_at: datetime
    verified: bool


def keep(backups: Sequence[Backup], *, last: int, daily: int, weekly: int) -> set[str]:
    """The ids to keep: the newest ``last``; the newest of each of the ``daily`` most
    recent UTC days and ``weekly`` most recent ISO weeks that have a backup; and,
    always, the newest verified backup (a restore must have something known good).
    """
    newest_first = sorted(backups, key=lambda b: b.started_at, reverse=True)
    kept = {b.backup_id for b in newest_first[:last]}
    for span, generations in (("day", daily), ("week", weekly)):
        seen: set[tuple[int, int] | str] = set()
        for b in newest_first:
            if len(seen) >= generations:
                break
            when = b.started_at
            bucket: tuple[int, int] | str = (
                when.date().isoformat() if span == "day" else when.isocalendar()[:2]
            )
            if bucket not in seen:
                seen.add(bucket)
                kept.add(b.backup_id)
    verified = next((b for b in newest_first if b.verified), None)
    if verified is not None:
        kept.add(verified.backup_id)
    return kept

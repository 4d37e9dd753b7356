"""List backups.

The backups of the database in the bucket, newest first, with age, size, encryption
and verification.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from services.backup import jobs


def arguments(p: argparse.ArgumentParser) -> None:
    """No options."""


def _age(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def run(args: argparse.Namespace, ctx: jobs.Context) -> int:
    now = datetime.now(UTC)
    items = jobs.listing(ctx)
    print(f"{'BACKUP':<26} {'AGE':>6} {'SIZE':>12} {'ENCRYPTION':<10} VERIFIED")
    for item in items:
        m, v = item.manifest, item.verification
        status = "never" if v is None else ("ok" if v.ok else "FAILED")
        if v is not None:
            status += f" {v.verified_at:%Y-%m-%d %H:%M}Z"
        age = _age((now - m.finished_at).total_seconds())
        print(f"{m.backup_id:<26} {age:>6} {m.size:>12} {m.encryption:<10} {status}")
    if not items:
        print(f"(no backups of {ctx.db.database_name})")
    return 0

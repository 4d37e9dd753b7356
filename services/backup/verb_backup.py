"""Take a backup now.

pg_dump (custom format) of one exported snapshot, encrypted with age when
FLEETPLANE_BACKUP_AGE_RECIPIENT (or an identity) is set, streamed to the bucket with a
manifest. Refused (exit 75) while another backup of the database runs.
"""

from __future__ import annotations

import argparse

from services.backup import jobs


def arguments(p: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace, ctx: jobs.Context) -> int:
    manifest = jobs.backup(ctx)
    if manifest.encryption == "none":
        print("WARNING: this backup is NOT encrypted")
    print(
        f"backup {manifest.backup_id}: {manifest.size} bytes, encryption {manifest.encryption}, "
        f"{(manifest.finished_at - manifest.started_at).total_seconds():.1f} s, "
        f"s3://{ctx.s3.bucket}/{manifest.dump_key}"
    )
    return 0

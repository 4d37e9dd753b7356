"""Delete backups outside the retention policy.

Keeps the newest FLEETPLANE_BACKUP_KEEP_LAST backups, the newest of each of the last
KEEP_DAILY days and KEEP_WEEKLY ISO weeks, and always the newest verified backup;
aborts multipart uploads left by interrupted backups.
"""

from __future__ import annotations

import argparse

from services.backup import jobs


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")


def run(args: argparse.Namespace, ctx: jobs.Context) -> int:
    result = jobs.prune(ctx, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"kept {len(result.kept)}, {verb} {len(result.deleted)} backups"
        f" ({', '.join(result.deleted) or 'none'}); aborted {result.aborted_uploads} "
        f"interrupted uploads; removed {result.orphans} orphan objects"
    )
    return 0

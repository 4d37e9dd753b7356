"""Test-restore a backup.

Restores the newest (or a named) backup into a scratch database, compares every
table's row count and checksum with the manifest (taken from the dump's own
snapshot), drops the scratch database and records the result in the bucket. Exit 1
when they differ.
"""

from __future__ import annotations

import argparse

from services.backup import jobs


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backup", default="latest", help="backup id (default: the newest)")


def run(args: argparse.Namespace, ctx: jobs.Context) -> int:
    result = jobs.verify(ctx, args.backup)
    print(f"backup {result.backup_id}: {'verified' if result.ok else 'FAILED'}: {result.detail}")
    return 0 if result.ok else 1

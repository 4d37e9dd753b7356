"""``python -m services.backup <verb>``: argument parsing and the one place errors
become exit codes. Each verb lives in its own module and delegates to ``jobs``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from services.backup import (
    verb_backup,
    verb_list,
    verb_prune,
    verb_restore,
    verb_schedule,
    verb_verify,
)
from services.backup.crypto import CryptoError
from services.backup.jobs import BackupFailure, Context
from services.backup.postgres import BackupBusy, DatabaseUnavailable, RestoreRefused
from services.backup.settings import BackupSettings, S3Settings
from services.backup.storage import S3Storage, StorageError
from services.shared.logs import configure_logging
from services.shared.settings import DatabaseSettings

logger = logging.getLogger("services.backup")

# sysexits.h: EX_TEMPFAIL tells a scheduler "try again later", not "broken".
EXIT_FAILED = 1
EXIT_BUSY = 75


class Verb(Protocol):
    """A verb module: its docstring's first line is the help, the whole of it the description."""

    def arguments(self, p: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace, ctx: Context) -> int: ...


VERBS: Final[Mapping[str, Verb]] = {
    "backup": verb_backup,
    "list": verb_list,
    "restore": verb_restore,
    "verify": verb_verify,
    "prune": verb_prune,
    "schedule": verb_schedule,
}


def make_context() -> Context:
    s3 = S3Settings()
    return Context(DatabaseSettings(), BackupSettings(), s3, S3Storage(s3))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m services.backup",
        description="Backups of Fleetplane's PostgreSQL database to S3-compatible storage. "
        "Settings come from FLEETPLANE_DATABASE_*, FLEETPLANE_S3_* and FLEETPLANE_BACKUP_*.",
    )
    top.add_argument("--loglevel", default="INFO")
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, verb in VERBS.items():
        doc = verb.__doc__ or ""
        summary = doc.split("\n", 1)[0].rstrip(".")
        p = verbs.add_parser(name, help=summary[:1].lower() + summary[1:], description=doc)
        verb.arguments(p)
        p.set_defaults(run=verb.run)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(args.loglevel.upper())
    run: Callable[[argparse.Namespace, Context], int] = args.run
    try:
        return run(args, make_context())
    except BackupBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BUSY
    except (
        BackupFailure,
        StorageError,
        DatabaseUnavailable,
        CryptoError,
        RestoreRefused,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED

"""Restore a backup into a database, made safe to run against the live Kafka topic.

Checks the object's sha256 and the key, refuses a non-empty target (unless --force)
and a backup older than Kafka's retention, runs pg_restore, upgrades the schema to the
newest revision, moves the epoch and command id sequences past anything the lost
database issued, and replays the identity journal (revocations, certificates, used
tokens, CAs, operator keys). Stored offsets are kept, so restarted controllers replay
the events accepted after the backup from Kafka. See docs/runbooks/restore.md.
"""

from __future__ import annotations

import argparse

from services.backup import jobs, postgres
from services.shared.settings import KafkaSettings


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backup", default="latest", help="backup id (default: the newest)")
    p.add_argument(
        "--target",
        help="libpq DSN of the database to restore into (default: FLEETPLANE_DATABASE_*)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace the contents of a non-empty target"
    )


def run(args: argparse.Namespace, ctx: jobs.Context) -> int:
    target = ctx.db if args.target is None else postgres.settings_from_dsn(args.target)
    kafka = KafkaSettings()
    done = jobs.restore(
        ctx,
        args.backup,
        target,
        force=args.force,
        kafka_bootstrap=kafka.kafka_bootstrap,
        events_topic=kafka.events_topic,
        identity_topic=kafka.identity_topic,
    )
    r = done.repairs
    print(f"restored backup {done.manifest.backup_id} into {target.database_name}")
    if r.migrated_from is not None:
        print(f"schema upgraded from Alembic revision {r.migrated_from} to the newest")
    print(f"ownership epoch sequence now at {r.epoch_sequence_value}")
    if r.commands_id_sequence_value is not None:
        print(f"commands.id sequence now at {r.commands_id_sequence_value}")
    changed = ", ".join(f"{n} {kind}" for kind, n in sorted(done.identity_changes.items()))
    print(f"identity changes since the backup replayed from the journal: {changed or 'none'}")
    print("next: start (or restart) the controllers; they replay Kafka from the stored offsets")
    return 0

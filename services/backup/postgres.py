"""PostgreSQL's side of backups: the lock, the exported snapshot and what it holds,
pg_dump and pg_restore, and the repairs that make a restored database safe to run.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from services.backup.manifest import TableSum
from services.shared.migrate import alembic_config, upgrade
from services.shared.settings import DatabaseSettings

# pg_try_advisory_lock key shared by every backup of one database ("fpbackup").
BACKUP_LOCK_KEY = 0x6670_6261_636B_7570
EPOCH_SEQUENCE = "ownership_epoch_seq"


class DatabaseUnavailable(Exception):
    """PostgreSQL could not be reached or refused the login; the message says where."""


class BackupBusy(Exception):
    """Another backup of the same database holds the advisory lock."""


class RestoreRefused(Exception):
    """The restore would be unsafe; the message says why and what to do."""


def settings_from_dsn(dsn: str) -> DatabaseSettings:
    """DatabaseSettings from a libpq DSN (``host=… dbname=…`` or ``postgresql://…``)."""
    parts = conninfo_to_dict(dsn)
    base = DatabaseSettings()
    update: dict[str, Any] = {}
    for key, field in (
        ("host", "database_host"),
        ("port", "database_port"),
        ("dbname", "database_name"),
        ("user", "database_user"),
        ("password", "database_password"),
    ):
        if parts.get(key) is not None:
            update[field] = parts[key]
    return DatabaseSettings.model_validate({**base.model_dump(), **update})


def connect(db: DatabaseSettings, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(db.libpq_dsn, autocommit=autocommit, connect_timeout=5)
    except psycopg.OperationalError as e:
        raise DatabaseUnavailable(
            f"PostgreSQL at {db.database_host}:{db.database_port} (database "
            f"{db.database_name}, user {db.database_user}) unreachable: {str(e).strip()}; "
            "check FLEETPLANE_DATABASE_* and that the server is running"
        ) from e


@contextmanager
def backup_lock(db: DatabaseSettings) -> Iterator[None]:
    """Hold the database's backup lock for the block; raises BackupBusy if taken.

    A session-level advisory lock: released when the block ends or the process dies.
    """
    with connect(db, autocommit=True) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (BACKUP_LOCK_KEY,)).fetchone()
        if row is None or not row[0]:
            raise BackupBusy(
                f"another backup or prune of database {db.database_name} is running "
                "(its advisory lock is held); wait for it to finish"
            )
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (BACKUP_LOCK_KEY,))


def _session_formats(conn: psycopg.Connection[Any]) -> None:
    # Row checksums hash each row's text form, which these settings shape; the same
    # on the backup's snapshot and on a restored copy.
    conn.execute("SET TIME ZONE 'UTC'")
    conn.execute("SET datestyle = 'ISO, YMD'")
    conn.execute("SET extra_float_digits = 1")
    conn.execute("SET bytea_output = 'hex'")


@dataclass(frozen=True, slots=True)
class Described:
    pg_version: str
    alembic_revision: str | None
    epoch_sequence_value: int | None
    commands_id_sequence_value: int | None
    partition_offsets: dict[str, dict[int, int]]


def _sequence_value(conn: psycopg.Connection[Any], name: str | None) -> int | None:
    if name is None:
        return None
    row = conn.execute(
        "SELECT last_value FROM pg_sequences WHERE format('%%I.%%I', schemaname, sequencename)"
        " = %s OR sequencename = %s",
        (name, name),
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _has_table(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


def describe(conn: psycopg.Connection[Any]) -> Described:
    """What the manifest records about the database, read in the caller's transaction."""
    version = conn.execute("SHOW server_version").fetchone()
    revision = None
    if _has_table(conn, "public.alembic_version"):
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        revision = None if row is None else str(row[0])
    commands_seq = None
    if _has_table(conn, "public.commands"):
        row = conn.execute("SELECT pg_get_serial_sequence('public.commands', 'id')").fetchone()
        commands_seq = None if row is None else row[0]
    offsets: dict[str, dict[int, int]] = {}
    if _has_table(conn, "public.partition_ownership"):
        for topic, partition, next_offset in conn.execute(
            "SELECT topic, partition, next_offset FROM partition_ownership"
        ):
            offsets.setdefault(str(topic), {})[int(partition)] = int(next_offset)
    return Described(
        pg_version=str(version[0]) if version else "?",
        alembic_revision=revision,
        epoch_sequence_value=_sequence_value(conn, EPOCH_SEQUENCE),
        commands_id_sequence_value=_sequence_value(conn, commands_seq),
        partition_offsets=offsets,
    )


def table_sums(conn: psycopg.Connection[Any]) -> dict[str, TableSum]:
    """Row count and an order-independent checksum of every table in the public schema."""
    _session_formats(conn)
    names = [
        str(r[0])
        for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
    ]
    sums: dict[str, TableSum] = {}
    for name in names:
        # The first 60 bits of each row's md5, summed as numeric (no overflow): the
        # same whatever order pg_restore wrote the rows in.
        query = sql.SQL(
            "SELECT count(*), coalesce(sum(('x' || substr(md5(t::text), 1, 15))::bit(60)"
            "::bigint::numeric), 0)::text FROM {} AS t"
        ).format(sql.Identifier("public", name))
        row = conn.execute(query).fetchone()
        assert row is not None
        sums[name] = TableSum(rows=int(row[0]), checksum=str(row[1]))
    return sums


@contextmanager
def exported_snapshot(db: DatabaseSettings) -> Iterator[tuple[psycopg.Connection[Any], str]]:
    """A read-only repeatable-read transaction and its exported snapshot id.

    pg_dump ``--snapshot`` sees exactly what this transaction sees, so the manifest's
    row counts and checksums describe the dump. Open until the block ends.
    """
    conn = connect(db)
    try:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        yield conn, str(row[0])
    finally:
        conn.close()


def _env(db: DatabaseSettings) -> dict[str, str]:
    # The password goes through the environment, never the command line (ps shows it).
    return {
        **os.environ,
        "PGHOST": db.database_host,
        "PGPORT": str(db.database_port),
        "PGUSER": db.database_user,
        "PGDATABASE": db.database_name,
        "PGPASSWORD": db.database_password.get_secret_value(),
        "PGCONNECT_TIMEOUT": "5",
    }


def tool_version(pg_bin: Path, tool: str = "pg_dump") -> str:
    out = subprocess.run(  # noqa: S603 # our own binary, no shell
        [str(pg_bin / tool), "--version"], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def start_dump(
    db: DatabaseSettings, pg_bin: Path, snapshot: str, compress: int, stderr: IO[bytes]
) -> subprocess.Popen[bytes]:
    """pg_dump in custom format of the exported snapshot, writing to its stdout pipe."""
    return subprocess.Popen(  # noqa: S603 # fixed arguments, no shell
        [
            str(pg_bin / "pg_dump"),
            "--format=custom",
            f"--compress={compress}",
            f"--snapshot={snapshot}",
            "--no-owner",
            "--no-privileges",
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=_env(db),
    )


def start_restore(db: DatabaseSettings, pg_bin: Path, stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    """pg_restore into ``db`` from its stdin pipe, all or nothing (one transaction)."""
    return subprocess.Popen(  # noqa: S603 # fixed arguments, no shell
        [
            str(pg_bin / "pg_restore"),
            "--dbname",
            db.database_name,
            "--single-transaction",
            "--exit-on-error",
            "--no-owner",
            "--no-privileges",
        ],
        stdin=subprocess.PIPE,
        stderr=stderr,
        env=_env(db),
    )


def user_tables(db: DatabaseSettings) -> int:
    with connect(db) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', "
            "'information_schema')"
        ).fetchone()
        return int(row[0]) if row else 0


def wipe_public_schema(db: DatabaseSettings) -> None:
    with connect(db, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
        conn.execute("CREATE SCHEMA public")


def create_database(admin: DatabaseSettings, name: str) -> None:
    with connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(admin: DatabaseSettings, name: str) -> None:
    with connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def sums_of(db: DatabaseSettings) -> dict[str, TableSum]:
    with connect(db) as conn:
        return table_sums(conn)


def check_revision(db: DatabaseSettings, revision: str | None) -> None:
    """Refuse a backup whose Alembic revision this code does not know (a newer release's)."""
    if revision is None:
        return
    script = ScriptDirectory.from_config(alembic_config(db.sync_url))
    try:
        known = script.get_revision(revision)
    except CommandError as e:
        known = None
        cause: Exception | None = e
    else:
        cause = None
    if known is None:
        raise RestoreRefused(
            f"the backup's schema is at Alembic revision {revision}, which this release does "
            "not know (taken by a newer release?); restore it with the release that took it"
        ) from cause


def clock_floor() -> int:
    """Microseconds since the epoch: a bound above every epoch or command id ever issued.

    Sequences start at 1 and each restore moves them to at least this floor; they
    grow by one per partition assignment or command, far below one per microsecond,
    so whatever the lost database issued after the backup is below the floor now
    (given a clock that does not step back).
    """
    return time.time_ns() // 1000


@dataclass(frozen=True, slots=True)
class Repairs:
    migrated_from: str | None
    epoch_sequence_value: int
    commands_id_sequence_value: int | None


def make_safe(db: DatabaseSettings, from_revision: str | None) -> Repairs:
    """After pg_restore: newest schema, and sequences moved past the lost database's.

    Stored partition offsets are left as restored, so controllers replay from Kafka
    every event accepted after the snapshot.
    """
    migrate = from_revision != _head(db)
    if migrate:
        upgrade(db)
    floor = clock_floor()
    with connect(db) as conn:
        row = conn.execute(
            "SELECT setval(%s, greatest((SELECT last_value FROM ownership_epoch_seq), %s))",
            (EPOCH_SEQUENCE, floor),
        ).fetchone()
        assert row is not None
        epoch = int(row[0])
        commands = None
        seq = conn.execute("SELECT pg_get_serial_sequence('public.commands', 'id')").fetchone()
        if seq is not None and seq[0] is not None:
            query = sql.SQL("SELECT setval(%s, greatest((SELECT last_value FROM {}), %s))").format(
                sql.SQL(seq[0])
            )
            crow = conn.execute(query, (seq[0], floor)).fetchone()
            commands = None if crow is None else int(crow[0])
        conn.commit()
    return Repairs(
        migrated_from=from_revision if migrate else None,
        epoch_sequence_value=epoch,
        commands_id_sequence_value=commands,
    )


def _head(db: DatabaseSettings) -> str | None:
    return ScriptDirectory.from_config(alembic_config(db.sync_url)).get_current_head()

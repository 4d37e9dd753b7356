"""What the verbs do. Each function blocks until done and raises a BackupFailure
subclass, or one of the modules' own errors, with a message for the operator.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from services.backup import crypto, identity, kafka, postgres, retention
from services.backup.manifest import Layout, Manifest, TableSum, Verification
from services.backup.settings import BackupSettings, S3Settings
from services.backup.storage import NotFound, Storage
from services.shared.identity_journal import JournalUnavailable
from services.shared.settings import DatabaseSettings

logger = logging.getLogger(__name__)


class BackupFailure(Exception):
    """The verb could not do its job; the message says why and what to do."""


@dataclass(frozen=True)
class Context:
    db: DatabaseSettings
    settings: BackupSettings
    s3: S3Settings
    storage: Storage

    @property
    def layout(self) -> Layout:
        return Layout(self.s3.prefix, self.db.database_name)


class _Tap(io.RawIOBase):
    """Reads a pipe for the uploader, hashing and counting; at EOF runs a check that
    raises if the producer failed, so the upload is aborted instead of completed."""

    def __init__(self, source: IO[bytes], at_eof: Callable[[], None]) -> None:
        self.source = source
        self.at_eof = at_eof
        self.sha = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.source.read(len(buffer))
        if not data:
            self.at_eof()
            return 0
        n = len(data)
        buffer[:n] = data
        self.sha.update(data)
        self.size += n
        return n


class _Worker(threading.Thread):
    """A thread that keeps the exception it ended with."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._job = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._job()
        # Whatever ends the job, the thread that joins this one re-raises it.
        except BaseException as e:
            self.error = e


def _stderr_tail(stderr: IO[bytes]) -> str:
    stderr.seek(0)
    return stderr.read().decode(errors="replace").strip()[-2000:]


def new_backup_id(now: datetime) -> str:
    # Sorts by time; the random tail keeps two ids of one second apart.
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def abort_open_uploads(ctx: Context) -> int:
    """Abort multipart uploads left by interrupted backups. Call with the lock held."""
    uploads = ctx.storage.open_uploads(ctx.layout.root)
    for upload in uploads:
        logger.warning("aborting the interrupted upload of %s", upload.key)
        ctx.storage.abort(upload)
    return len(uploads)


def backup(ctx: Context) -> Manifest:
    """pg_dump of one exported snapshot, encrypted when a key is set, streamed to S3."""
    to = crypto.recipient(ctx.settings)
    if to is None:
        logger.warning(
            "backup is NOT encrypted: set FLEETPLANE_BACKUP_AGE_RECIPIENT (or an identity)"
        )
    dump_version = postgres.tool_version(ctx.settings.pg_bin)
    with postgres.backup_lock(ctx.db):
        ctx.storage.check()
        abort_open_uploads(ctx)
        started = datetime.now(UTC)
        backup_id = new_backup_id(started)
        key = ctx.layout.dump(backup_id, encrypted=to is not None)
        with (
            postgres.exported_snapshot(ctx.db) as (conn, snapshot),
            tempfile.TemporaryFile() as stderr,
        ):
            described = postgres.describe(conn)
            dump = postgres.start_dump(
                ctx.db, ctx.settings.pg_bin, snapshot, ctx.settings.compress_level, stderr
            )
            assert dump.stdout is not None
            dump_out: IO[bytes] = dump.stdout
            sums: dict[str, TableSum] = {}

            def count() -> None:
                sums.update(postgres.table_sums(conn))

            counter = _Worker(count, "table-sums")
            counter.start()
            workers = [counter]
            source: IO[bytes] = dump_out
            read_end = None
            if to is not None:
                read_fd, write_fd = os.pipe()
                read_end = os.fdopen(read_fd, "rb")
                write_end = os.fdopen(write_fd, "wb")

                def encrypt() -> None:
                    with write_end:
                        crypto.encrypt(dump_out, write_end, to)

                encryptor = _Worker(encrypt, "encrypt")
                encryptor.start()
                workers.append(encryptor)
                source = read_end

            def finished_cleanly() -> None:
                for worker in workers[1:]:
                    worker.join()
                    if worker.error is not None:
                        raise BackupFailure(f"encryption failed: {worker.error}")
                if dump.wait() != 0:
                    raise BackupFailure(
                        f"pg_dump failed (exit {dump.returncode}): {_stderr_tail(stderr)}"
                    )

            tap = _Tap(source, finished_cleanly)
            try:
                ctx.storage.upload(key, io.BufferedReader(tap, buffer_size=1024 * 1024))
            finally:
                if dump.poll() is None:
                    dump.kill()
                dump.wait()
                dump.stdout.close()
                if read_end is not None:
                    read_end.close()
                for worker in workers:
                    worker.join()
            if counter.error is not None:
                raise BackupFailure(f"counting rows in the snapshot failed: {counter.error}")
        manifest = Manifest(
            backup_id=backup_id,
            database=ctx.db.database_name,
            dump_key=key,
            sha256=tap.sha.hexdigest(),
            size=tap.size,
            started_at=started,
            finished_at=datetime.now(UTC),
            pg_version=described.pg_version,
            pg_dump_version=dump_version,
            alembic_revision=described.alembic_revision,
            epoch_sequence_value=described.epoch_sequence_value,
            commands_id_sequence_value=described.commands_id_sequence_value,
            partition_offsets=described.partition_offsets,
            tables=sums,
            encryption="none" if to is None else "age",
            recipient=None if to is None else str(to),
        )
        ctx.storage.put(ctx.layout.manifest(backup_id), manifest.model_dump_json(indent=2).encode())
    return manifest


@dataclass(frozen=True)
class Listed:
    manifest: Manifest
    verification: Verification | None


def listing(ctx: Context) -> list[Listed]:
    """Complete backups (those with a manifest), newest first."""
    objects = ctx.storage.list_objects(ctx.layout.root)
    keys = {o.key for o in objects}
    found = []
    for key in sorted(keys, reverse=True):
        if not key.endswith("/manifest.json"):
            continue
        manifest = Manifest.model_validate_json(ctx.storage.get(key))
        verified_key = ctx.layout.verification(manifest.backup_id)
        verification = None
        if verified_key in keys:
            verification = Verification.model_validate_json(ctx.storage.get(verified_key))
        found.append(Listed(manifest, verification))
    found.sort(key=lambda item: item.manifest.started_at, reverse=True)
    return found


def find(ctx: Context, backup_id: str | None) -> Manifest:
    """The named backup, or the newest when ``backup_id`` is None or "latest"."""
    if backup_id in (None, "latest"):
        items = listing(ctx)
        if not items:
            raise BackupFailure(f"no backups of {ctx.db.database_name} in the bucket")
        return items[0].manifest
    assert backup_id is not None
    try:
        return Manifest.model_validate_json(ctx.storage.get(ctx.layout.manifest(backup_id)))
    except NotFound as e:
        raise BackupFailure(f"no backup {backup_id} of {ctx.db.database_name}") from e


def _fetch_checked(ctx: Context, manifest: Manifest, into: IO[bytes]) -> None:
    """Download the dump object and refuse it unless its sha256 matches the manifest."""
    ctx.storage.download(manifest.dump_key, into)
    into.flush()
    into.seek(0)
    sha = hashlib.sha256()
    size = 0
    while chunk := into.read(1024 * 1024):
        sha.update(chunk)
        size += len(chunk)
    if sha.hexdigest() != manifest.sha256 or size != manifest.size:
        raise BackupFailure(
            f"checksum mismatch for backup {manifest.backup_id}: the object has sha256 "
            f"{sha.hexdigest()} ({size} bytes), the manifest says {manifest.sha256} "
            f"({manifest.size} bytes); the object is damaged, nothing was restored — "
            "restore another backup"
        )
    into.seek(0)


def _pg_restore(
    ctx: Context, manifest: Manifest, dump: IO[bytes], target: DatabaseSettings
) -> None:
    key = None
    if manifest.encryption == "age":
        key = crypto.identity(ctx.settings)
        if key is None:
            raise BackupFailure(
                f"backup {manifest.backup_id} is encrypted: set FLEETPLANE_BACKUP_AGE_IDENTITY "
                "or FLEETPLANE_BACKUP_AGE_IDENTITY_FILE"
            )
        crypto.check_key(dump, key)
        dump.seek(0)
    with tempfile.TemporaryFile() as stderr:
        restore = postgres.start_restore(target, ctx.settings.pg_bin, stderr)
        assert restore.stdin is not None
        try:
            if key is None:
                shutil.copyfileobj(dump, restore.stdin, 1024 * 1024)
            else:
                crypto.decrypt(dump, restore.stdin, key)
            restore.stdin.close()
        except BrokenPipeError:
            pass  # pg_restore stopped reading: its exit code and stderr say why
        finally:
            if not restore.stdin.closed:
                restore.stdin.close()
            code = restore.wait()
        if code != 0:
            raise BackupFailure(f"pg_restore failed (exit {code}): {_stderr_tail(stderr)}")


def _spool(ctx: Context) -> IO[bytes]:
    folder = ctx.settings.work_dir
    return tempfile.TemporaryFile(dir=str(folder) if folder else None)


@dataclass(frozen=True)
class Restored:
    manifest: Manifest
    repairs: postgres.Repairs
    identity_changes: dict[str, int]
    """Identity journal entries that changed the restored database, by kind."""


def restore(
    ctx: Context,
    backup_id: str | None,
    target: DatabaseSettings,
    *,
    force: bool,
    kafka_bootstrap: str,
    events_topic: str,
    identity_topic: str,
) -> Restored:
    """Restore into ``target`` and make it safe to run against the live Kafka topic."""
    manifest = find(ctx, backup_id)
    postgres.check_revision(target, manifest.alembic_revision)
    topics = sorted({events_topic, *manifest.partition_offsets})
    try:
        starts = kafka.log_starts(kafka_bootstrap, topics)
    except kafka.KafkaUnavailable as e:
        raise BackupFailure(
            f"{e}; restore needs Kafka to check that it still holds every event after the backup"
        ) from e
    lost = kafka.gaps(manifest.partition_offsets, starts)
    if lost:
        where = ", ".join(f"{t}[{p}] stored {o} < log start {s}" for t, p, o, s in lost)
        raise BackupFailure(
            f"backup {manifest.backup_id} is older than Kafka's retention: events after it "
            f"were deleted from Kafka ({where}); restoring it would lose them. Restore a "
            "newer backup; if there is none, the events in those gaps are gone (see "
            "docs/runbooks/restore.md)"
        )
    try:
        journal = identity.read_journal(kafka_bootstrap, identity_topic)
    except (JournalUnavailable, identity.UnknownEntry) as e:
        raise BackupFailure(
            f"{e}; restore needs the identity journal to bring back revocations and other "
            "identity changes made after the backup"
        ) from e
    if postgres.user_tables(target) and not force:
        raise BackupFailure(
            f"target database {target.database_name} is not empty; restore into an empty "
            "database, or pass --force to replace its contents"
        )
    with _spool(ctx) as spool:
        _fetch_checked(ctx, manifest, spool)
        if force:
            postgres.wipe_public_schema(target)
        _pg_restore(ctx, manifest, spool, target)
    repairs = postgres.make_safe(target, manifest.alembic_revision)
    changes = identity.apply(target.libpq_dsn, journal)
    return Restored(manifest, repairs, dict(changes))


def verify(ctx: Context, backup_id: str | None) -> Verification:
    """Restore into a scratch database, compare with the manifest, record the result."""
    manifest = find(ctx, backup_id)
    scratch = f"fpverify_{secrets.token_hex(6)}"
    admin = ctx.db.model_copy(update={"database_name": "postgres"})
    scratch_db = ctx.db.model_copy(update={"database_name": scratch})
    postgres.create_database(admin, scratch)
    try:
        with _spool(ctx) as spool:
            _fetch_checked(ctx, manifest, spool)
            _pg_restore(ctx, manifest, spool, scratch_db)
        sums = postgres.sums_of(scratch_db)
    finally:
        postgres.drop_database(admin, scratch)
    problems = [
        f"{name}: {sums.get(name)} != {want}"
        for name, want in manifest.tables.items()
        if sums.get(name) != want
    ]
    problems += [f"{name}: not in the manifest" for name in sums if name not in manifest.tables]
    result = Verification(
        backup_id=manifest.backup_id,
        ok=not problems,
        verified_at=datetime.now(UTC),
        detail="; ".join(problems) or f"{len(sums)} tables match the manifest",
    )
    ctx.storage.put(
        ctx.layout.verification(manifest.backup_id), result.model_dump_json(indent=2).encode()
    )
    return result


@dataclass(frozen=True)
class Pruned:
    kept: list[str]
    deleted: list[str]
    aborted_uploads: int
    orphans: int


def prune(ctx: Context, *, dry_run: bool = False) -> Pruned:
    """Delete backups outside the retention policy; never the newest verified one."""
    with postgres.backup_lock(ctx.db):
        items = listing(ctx)
        keep = retention.keep(
            [
                retention.Backup(
                    i.manifest.backup_id,
                    i.manifest.started_at,
                    i.verification is not None and i.verification.ok,
                )
                for i in items
            ],
            last=ctx.settings.keep_last,
            daily=ctx.settings.keep_daily,
            weekly=ctx.settings.keep_weekly,
        )
        doomed = [i.manifest.backup_id for i in items if i.manifest.backup_id not in keep]
        complete = {i.manifest.backup_id for i in items}
        objects = ctx.storage.list_objects(ctx.layout.root)
        # Objects of no complete backup: a dump whose manifest was never written. No
        # backup is running (we hold its lock), so none of them is still being made.
        orphans = [o.key for o in objects if ctx.layout.backup_id_of(o.key) not in complete]
        if dry_run:
            return Pruned(sorted(keep, reverse=True), doomed, 0, len(orphans))
        aborted = abort_open_uploads(ctx)
        for backup_id in doomed:
            folder = ctx.layout.folder(backup_id)
            # The manifest first: a backup without one is no longer listed, even if
            # deleting its dump fails half-way (the next prune removes that orphan).
            ctx.storage.delete([ctx.layout.manifest(backup_id)])
            ctx.storage.delete(
                [
                    o.key
                    for o in objects
                    if o.key.startswith(folder) and not o.key.endswith("/manifest.json")
                ]
            )
        ctx.storage.delete(orphans)
    return Pruned(sorted(keep, reverse=True), doomed, aborted, len(orphans))

"""Backups and restores on the real PostgreSQL, S3 server (Versity Gateway) and Kafka."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pyrage
import pytest
from aiokafka import AIOKafkaProducer
from alembic import command
from prometheus_client import CollectorRegistry
from psycopg import sql

from services.backup import jobs, postgres, verb_schedule
from services.backup.crypto import CryptoError
from services.backup.manifest import Layout, TableSum, Verification
from services.backup.settings import BackupSettings, S3Settings
from services.backup.storage import S3Storage, StorageError
from services.gateway_auth.issuers import retire
from services.gateway_auth.pki import rotate_issuing_ca
from services.shared.migrate import alembic_config
from services.shared.settings import DatabaseSettings, KafkaSettings
from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.enrollment import Enroller, make_csr, new_key
from tests.support.invariants import Ledger, check
from tests.support.load import send_steadily, wait_all_applied
from tests.support.operators import OperatorClient
from tests.support.ownership import delete_records
from tests.support.stack import ROOT, drop_database
from tests.support.waiting import eventually

AgentFactory = Any
WEB = {"kind": "deployment", "name": "web", "version": "2.0.0"}
PROBE = "/v1/events/ev-probe"
"""A cheap agent route: reads one event's status (pending)."""


@pytest.fixture
def ctx(deployment: Deployment) -> Iterator[jobs.Context]:
    """Backups of the test's database under a prefix of its own, encrypted."""
    s3 = S3Settings(prefix=f"test-{uuid.uuid4().hex[:10]}", part_size_mib=5)
    storage = S3Storage(s3)
    try:
        storage.check()
    except StorageError as e:
        pytest.fail(f"{e} (start the stack with `bash infra/local/stack.sh up`)")
    key = str(pyrage.x25519.Identity.generate())
    settings = BackupSettings(age_identity=key)
    context = jobs.Context(deployment.fleet.database, settings, s3, storage)
    yield context
    storage.delete([o.key for o in storage.list_objects(s3.prefix + "/")])
    for upload in storage.open_uploads(s3.prefix + "/"):
        storage.abort(upload)


def empty_database(deployment: Deployment, name: str) -> DatabaseSettings:
    with psycopg.connect(deployment.fleet.stack.admin_dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return deployment.fleet.database.model_copy(update={"database_name": name})


def restore(ctx: jobs.Context, deployment: Deployment, target: DatabaseSettings) -> jobs.Restored:
    return jobs.restore(
        ctx,
        None,
        target,
        force=False,
        kafka_bootstrap=deployment.fleet.stack.kafka_bootstrap,
        events_topic=deployment.fleet.events_topic,
        identity_topic=deployment.fleet.identity_topic,
    )


@pytest.fixture
def scratch(deployment: Deployment) -> Iterator[list[str]]:
    """Names of extra databases a test made; dropped at the end."""
    names: list[str] = []
    yield names
    for name in names:
        drop_database(deployment.fleet.stack, name)


def cli(ctx: jobs.Context, *args: str) -> subprocess.Popen[str]:
    db = ctx.db
    env = {
        **os.environ,
        "FLEETPLANE_DATABASE_NAME": db.database_name,
        "FLEETPLANE_S3_PREFIX": ctx.s3.prefix,
        "FLEETPLANE_S3_PART_SIZE_MIB": "5",
        "FLEETPLANE_S3_MAX_ATTEMPTS": "2",
        "FLEETPLANE_S3_CONNECT_TIMEOUT_S": "1",
        "FLEETPLANE_S3_READ_TIMEOUT_S": "2",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.backup", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(120)
async def test_restore_drill_replays_kafka_and_keeps_every_invariant(
    deployment: Deployment, agents: AgentFactory, ctx: jobs.Context
) -> None:
    deployment.start_apis()
    deployment.start_controller()
    operator = OperatorClient(
        deployment.fleet.stack.pki_dir,
        deployment.operator_key("acme"),
        deployment.fleet.stack.operator_url,
    )
    agent: AgentClient = agents("acme", "prod", "agent-1")
    ledger = Ledger()
    await send_steadily(agent, ledger, batches=2, size=5)
    assert (await operator.set_desired("acme", "prod", 1, [WEB]))[0] == 202
    await wait_all_applied(deployment, ledger)

    # The backup runs while the controller applies a steady load.
    load = asyncio.create_task(send_steadily(agent, ledger, batches=8, size=5, pause_s=0.05))
    manifest = await asyncio.to_thread(jobs.backup, ctx)
    await load
    assert manifest.encryption == "age"

    # After the backup: more events, a new desired state, commands the agent sees.
    await send_steadily(agent, ledger, batches=2, size=5)
    web3 = {**WEB, "version": "3.0.0"}
    assert (await operator.set_desired("acme", "prod", 2, [web3]))[0] == 202
    await wait_all_applied(deployment, ledger)
    _status, seen = await eventually(
        lambda: agent.poll_commands(1),
        lambda r: any(c["revision"] == 2 for c in r[1].get("commands", [])),
        what="the agent sees revision 2's command",
    )
    newest_epoch_seen = max(c["epoch"] for c in seen["commands"])
    newest_id_seen = max(c["id"] for c in seen["commands"])

    # Lose the database.
    for process in [*deployment.controllers.values(), *deployment.apis.values()]:
        process.stop()
    deployment.stop_gateway_auth()
    name = deployment.fleet.database_name
    drop_database(deployment.fleet.stack, name)
    target = empty_database(deployment, name)

    restored = await asyncio.to_thread(restore, ctx, deployment, target)
    assert restored.repairs.epoch_sequence_value > newest_epoch_seen
    assert restored.repairs.commands_id_sequence_value is not None
    assert restored.repairs.commands_id_sequence_value > newest_id_seen

    with postgres.connect(target) as conn:
        rows = conn.execute("SELECT count(*) FROM event_records").fetchone()
    # What the backup's snapshot held; the rest must come back from Kafka.
    assert rows == (manifest.tables["event_records"].rows,)
    assert postgres.sums_of(target)["event_records"] == manifest.tables["event_records"]

    deployment.start_apis()
    deployment.start_controller()
    await wait_all_applied(deployment, ledger)
    report = check(ledger, deployment.fleet.stack.admin_dsn(name))
    assert report.ok, report
    assert report.recorded == report.accepted == 60

    # A change after the restore reaches the agent with an epoch newer than any it saw.
    web4 = {**WEB, "version": "4.0.0"}
    assert (await operator.set_desired("acme", "prod", 3, [web4]))[0] == 202
    _status, reply = await eventually(
        lambda: agent.poll_commands(1),
        lambda r: any(c["revision"] == 3 for c in r[1].get("commands", [])),
        what="the agent sees revision 3's command",
    )
    fresh = [c for c in reply["commands"] if c["revision"] == 3]
    assert all(c["epoch"] > newest_epoch_seen and c["id"] > newest_id_seen for c in fresh)


def test_a_flipped_byte_is_refused_before_anything_is_restored(
    deployment: Deployment, ctx: jobs.Context, scratch: list[str]
) -> None:
    manifest = jobs.backup(ctx)
    blob = bytearray(ctx.storage.get(manifest.dump_key))
    blob[len(blob) // 2] ^= 0x01
    ctx.storage.put(manifest.dump_key, bytes(blob))
    scratch.append(f"{deployment.fleet.database_name}_r")
    target = empty_database(deployment, scratch[-1])
    with pytest.raises(jobs.BackupFailure, match="checksum mismatch"):
        restore(ctx, deployment, target)
    assert postgres.user_tables(target) == 0


def test_a_wrong_key_is_refused_with_a_clear_error(
    deployment: Deployment, ctx: jobs.Context, scratch: list[str]
) -> None:
    jobs.backup(ctx)
    other = BackupSettings(age_identity=str(pyrage.x25519.Identity.generate()))
    wrong = jobs.Context(ctx.db, other, ctx.s3, ctx.storage)
    scratch.append(f"{deployment.fleet.database_name}_r")
    target = empty_database(deployment, scratch[-1])
    with pytest.raises(CryptoError, match="does not match the key"):
        restore(wrong, deployment, target)
    assert postgres.user_tables(target) == 0


def test_a_non_empty_target_is_refused_unless_forced(
    deployment: Deployment, ctx: jobs.Context
) -> None:
    jobs.backup(ctx)
    with pytest.raises(jobs.BackupFailure, match="not empty"):
        restore(ctx, deployment, ctx.db)
    done = jobs.restore(
        ctx,
        None,
        ctx.db,
        force=True,
        kafka_bootstrap=deployment.fleet.stack.kafka_bootstrap,
        events_topic=deployment.fleet.events_topic,
        identity_topic=deployment.fleet.identity_topic,
    )
    # The restore's repairs move sequences, never rows.
    assert postgres.sums_of(ctx.db) == done.manifest.tables


def test_verify_passes_on_a_good_backup_and_fails_on_a_wrong_manifest(
    ctx: jobs.Context,
) -> None:
    manifest = jobs.backup(ctx)
    assert jobs.verify(ctx, manifest.backup_id).ok
    tables = dict(manifest.tables)
    tables["commands"] = TableSum(rows=tables["commands"].rows + 1, checksum="0")
    layout = Layout(ctx.s3.prefix, ctx.db.database_name)
    lying = manifest.model_copy(update={"tables": tables})
    ctx.storage.put(layout.manifest(manifest.backup_id), lying.model_dump_json().encode())
    result = jobs.verify(ctx, manifest.backup_id)
    assert not result.ok
    assert "commands" in result.detail
    listed = {i.manifest.backup_id: i.verification for i in jobs.listing(ctx)}
    assert listed[manifest.backup_id] == result


def test_a_second_concurrent_backup_is_refused_by_the_lock(ctx: jobs.Context) -> None:
    with postgres.backup_lock(ctx.db):
        second = cli(ctx, "backup")
        out, err = second.communicate(timeout=60)
    assert second.returncode == 75, (out, err)
    assert "another backup" in err
    assert jobs.listing(ctx) == []


def _fill(db: DatabaseSettings, mib: int) -> None:
    """Incompressible rows, so the dump is about ``mib`` MiB whatever the compression."""
    with postgres.connect(db) as conn:
        conn.execute("CREATE TABLE ballast (b bytea)")
        with conn.cursor().copy("COPY ballast (b) FROM STDIN") as copy:
            for _ in range(mib * 64):
                copy.write_row((os.urandom(16 * 1024),))
        conn.commit()


def _s3(action: str) -> None:
    subprocess.run(["bash", str(ROOT / "infra/local/s3.sh"), action], check=True)


@pytest.mark.timeout(120)
async def test_s3_stopped_mid_upload_leaves_no_object_and_the_next_prune_aborts_it(
    ctx: jobs.Context,
) -> None:
    _fill(ctx.db, 40)
    layout = Layout(ctx.s3.prefix, ctx.db.database_name)
    backup = cli(ctx, "backup")
    try:
        # Freeze the backup once its multipart upload has begun, stop S3, let it go on.
        await eventually(
            lambda: asyncio.to_thread(ctx.storage.open_uploads, layout.root),
            bool,
            timeout_s=30,
            what="the multipart upload began",
        )
        os.kill(backup.pid, signal.SIGSTOP)
        _s3("stop")
        os.kill(backup.pid, signal.SIGCONT)
        out, err = await asyncio.to_thread(backup.communicate, timeout=60)
    finally:
        if backup.poll() is None:
            backup.kill()
        _s3("start")
    assert backup.returncode == 1, (out, err)
    assert "unreachable" in err
    assert ctx.storage.list_objects(layout.root) == []
    assert ctx.storage.open_uploads(layout.root) != []  # S3 was down: nobody could abort it
    pruned = jobs.prune(ctx)
    assert pruned.aborted_uploads >= 1
    assert ctx.storage.open_uploads(layout.root) == []
    assert ctx.storage.list_objects(layout.root) == []


def test_retention_keeps_exactly_what_the_policy_says(ctx: jobs.Context) -> None:
    layout = Layout(ctx.s3.prefix, ctx.db.database_name)
    start = datetime(2026, 11, 30, 0, 30, tzinfo=UTC)
    template = jobs.backup(ctx)
    ctx.storage.delete(
        [o.key for o in ctx.storage.list_objects(layout.root)]
    )  # keep only the synthetic history below
    ids = []
    for i in range(12):  # two a day for six days
        at = start + timedelta(hours=12 * i)
        backup_id = at.strftime("%Y%m%dT%H%M%SZ") + f"-{i:06x}"
        ids.append(backup_id)
        m = template.model_copy(
            update={"backup_id": backup_id, "started_at": at, "finished_at": at}
        )
        ctx.storage.put(layout.manifest(backup_id), m.model_dump_json().encode())
        ctx.storage.put(layout.dump(backup_id, encrypted=True), b"x")
    verified = Verification(backup_id=ids[1], ok=True, verified_at=start, detail="")
    ctx.storage.put(layout.verification(ids[1]), verified.model_dump_json().encode())
    policy = BackupSettings(keep_last=2, keep_daily=3, keep_weekly=0)
    result = jobs.prune(jobs.Context(ctx.db, policy, ctx.s3, ctx.storage))
    # Newest two; newest of the last three days (ids 11, 9, 7); the newest verified (1).
    expected = {ids[11], ids[10], ids[9], ids[7], ids[1]}
    assert set(result.kept) == expected
    assert {i.manifest.backup_id for i in jobs.listing(ctx)} == expected
    remaining = {layout.backup_id_of(o.key) for o in ctx.storage.list_objects(layout.root)}
    assert remaining == expected


def test_a_backup_at_the_previous_revision_restores_into_the_current_schema(
    deployment: Deployment, ctx: jobs.Context, scratch: list[str]
) -> None:
    config = alembic_config(ctx.db.sync_url)
    command.downgrade(config, "-1")
    with postgres.connect(ctx.db) as conn:
        old = postgres.describe(conn).alembic_revision
    manifest = jobs.backup(ctx)
    assert manifest.alembic_revision == old
    scratch.append(f"{deployment.fleet.database_name}_r")
    target = empty_database(deployment, scratch[-1])
    done = restore(ctx, deployment, target)
    assert done.repairs.migrated_from == old
    with postgres.connect(target) as conn:
        now = postgres.describe(conn).alembic_revision
        assert conn.execute("SELECT to_regclass('public.revocations')").fetchone() != (None,)
    assert now is not None
    assert now != old


async def test_a_backup_older_than_kafka_retention_is_refused(
    deployment: Deployment, ctx: jobs.Context, scratch: list[str]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=deployment.fleet.stack.kafka_bootstrap)
    await producer.start()
    try:
        for _ in range(3):
            await producer.send_and_wait(deployment.fleet.events_topic, b"{}", partition=1)
    finally:
        await producer.stop()
    await asyncio.to_thread(jobs.backup, ctx)  # no controller ran: every stored offset is 0
    await delete_records(deployment, 1, 2)  # retention deleted two unapplied records
    scratch.append(f"{deployment.fleet.database_name}_r")
    target = empty_database(deployment, scratch[-1])
    with pytest.raises(jobs.BackupFailure, match=r"older than Kafka's retention.*\[1\] stored 0"):
        await asyncio.to_thread(restore, ctx, deployment, target)
    assert postgres.user_tables(target) == 0


@pytest.mark.timeout(150)
async def test_identity_changes_after_the_backup_hold_after_the_restore(
    deployment: Deployment, ctx: jobs.Context, agents: AgentFactory, tmp_path: Path
) -> None:
    stack = deployment.fleet.stack
    # gateway_auth signs with a copy of the stack's issuing CA, rotated below.
    pki = tmp_path / "pki"
    pki.mkdir()
    for name in ("issuing-ca.pem", "issuing-ca.key", "root-ca.pem"):
        shutil.copy2(stack.pki_dir / name, pki / name)
    ca_env = {
        "FLEETPLANE_GATEWAY_AUTH_ISSUING_CA_CERT": str(pki / "issuing-ca.pem"),
        "FLEETPLANE_GATEWAY_AUTH_ISSUING_CA_KEY": str(pki / "issuing-ca.key"),
    }
    deployment.start_gateway_auth(ca_env)
    deployment.start_apis()
    operator = OperatorClient(stack.pki_dir, deployment.operator_key("acme"), stack.operator_url)
    enroller = Enroller(stack.pki_dir, stack.enroll_url, stack.edge_url, operator, tmp_path / "a")
    doomed: AgentClient = agents("acme", "prod", "doomed")
    assert (await doomed.get(PROBE))[0] == 200
    early_token = await enroller.token("acme", "prod")

    await asyncio.to_thread(jobs.backup, ctx)

    # After the backup: a CA rotation (with the old CA's window closing), an agent
    # enrolled under the new CA, a token from before the backup consumed, a revocation.
    old_ca, new_ca = rotate_issuing_ca(pki, offline_dir=stack.pki_offline_dir)
    rotated, _, _, _ = await enroller.enrolled_agent("acme", "prod", "rotated")
    status, late = await enroller.enroll(early_token, make_csr(new_key(), "late"))
    assert status == 201, late
    body = {"environment_id": "prod", "agent_id": "doomed", "reason": "test"}
    status, answer = await operator.request("POST", "/v1/operator/customers/acme/revocations", body)
    assert status == 201, answer
    kafka = KafkaSettings(
        kafka_bootstrap=stack.kafka_bootstrap, identity_topic=deployment.fleet.identity_topic
    )
    dsn = stack.admin_dsn(deployment.fleet.database_name)
    assert await asyncio.to_thread(retire, dsn, old_ca.subject.rfc4514_string(), 3600, kafka)

    # Lose the database; restore the backup, which predates all of the above.
    for process in deployment.apis.values():
        process.stop()
    deployment.stop_gateway_auth()
    name = deployment.fleet.database_name
    drop_database(stack, name)
    target = empty_database(deployment, name)
    done = await asyncio.to_thread(restore, ctx, deployment, target)
    assert done.identity_changes.get("revocation") == 1
    assert done.identity_changes.get("token_used") == 1

    with postgres.connect(target) as conn:
        revoked = conn.execute(
            "SELECT agent_id FROM revocations WHERE customer_id = 'acme'"
        ).fetchall()
        used = conn.execute(
            "SELECT used_at IS NOT NULL FROM enrollment_tokens WHERE token_sha256 = %s",
            (hashlib.sha256(early_token.encode()).digest(),),
        ).fetchone()
        cas = dict(conn.execute("SELECT subject_dn, retire_at IS NOT NULL FROM issuing_cas"))
    assert revoked == [("doomed",)]
    assert used == (True,)
    assert cas == {old_ca.subject.rfc4514_string(): True, new_ca.subject.rfc4514_string(): False}

    deployment.start_gateway_auth(ca_env)
    deployment.start_apis()
    try:
        # The revoked agent stays refused; the rotated one is accepted; the token is spent.
        assert (await doomed.get(PROBE))[0] == 403
        assert (await rotated.get(PROBE))[0] == 200
        status, again = await enroller.enroll(early_token, make_csr(new_key(), "again"))
        assert status != 201, again
    finally:
        await rotated.close()


def test_a_scheduled_cycle_backs_up_verifies_and_sets_the_metrics(ctx: jobs.Context) -> None:
    registry = CollectorRegistry()
    gauges = verb_schedule.Gauges(registry)
    before = datetime.now(UTC).timestamp()
    assert verb_schedule.cycle(ctx, gauges)
    last_success = registry.get_sample_value("fleetplane_backup_last_success_timestamp_seconds")
    last_verified = registry.get_sample_value("fleetplane_backup_last_verified_timestamp_seconds")
    assert last_success is not None
    assert last_success >= before
    assert last_verified == last_success
    size = registry.get_sample_value("fleetplane_backup_size_bytes")
    assert size == jobs.listing(ctx)[0].manifest.size

    # S3 unreachable: the cycle fails, counts it, and the gauges keep their values.
    down = S3Settings(endpoint="http://127.0.0.1:1", prefix=ctx.s3.prefix, max_attempts=1)
    broken = jobs.Context(ctx.db, ctx.settings, down, S3Storage(down))
    assert not verb_schedule.cycle(broken, gauges)
    failures = registry.get_sample_value("fleetplane_backup_failures_total", {"verb": "backup"})
    assert failures == 1
    assert (
        registry.get_sample_value("fleetplane_backup_last_success_timestamp_seconds")
        == last_success
    )

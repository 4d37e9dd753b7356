"""Invariants 3 and 4 on the real PostgreSQL, Kafka and controller processes."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from sqlalchemy import insert, select

from services.controller.ownership import FencedError, advance_fenced, take_epoch
from services.shared.db import create_engine
from services.shared.schema import event_records
from tests.support.deployment import Deployment
from tests.support.invariants import Ledger, check
from tests.support.load import send_steadily, wait_all_applied
from tests.support.waiting import eventually

AgentFactory = Any


async def test_a_write_with_a_stale_epoch_is_refused_and_rolled_back(
    deployment: Deployment,
) -> None:
    engine = create_engine(deployment.fleet.database, application_name="fence test")
    try:
        async with engine.begin() as conn:
            zombie = await take_epoch(conn, "events", 0, "zombie")
        async with engine.begin() as conn:
            successor = await take_epoch(conn, "events", 0, "successor")
        assert successor.epoch > zombie.epoch

        async def zombie_apply() -> None:
            async with engine.begin() as conn:
                await conn.execute(
                    insert(event_records).values(
                        customer_id="c",
                        agent_id="a",
                        event_id="zombie-write",
                        environment_id="e",
                        event_type="heartbeat",
                        boot_id="b",
                        seq=1,
                        status="applied",
                        partition=0,
                        offset=0,
                        epoch=zombie.epoch,
                        accepted_at=datetime.now(UTC),
                    )
                )
                await advance_fenced(conn, zombie, 1)

        with pytest.raises(FencedError):
            await zombie_apply()

        async with engine.begin() as conn:
            rows = (await conn.execute(select(event_records))).all()
            assert rows == []
            await advance_fenced(conn, successor, 1)  # the current owner still writes
    finally:
        await engine.dispose()


FLEET_TABLES = ("environments", "agent_status", "event_records", "commands")


def fleet_hash(dsn: str) -> str:
    digest = hashlib.sha256()
    with psycopg.connect(dsn) as conn:
        for table in FLEET_TABLES:
            rows = conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()  # noqa: S608
            digest.update(repr((table, rows)).encode())
    return digest.hexdigest()


async def test_redelivery_after_offset_reset_changes_nothing(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    controller = deployment.start_controller()
    ledger = Ledger()
    fleet_agents = [agents(f"cust-{i}", "prod", "agent-1") for i in range(4)]
    await asyncio.gather(*(send_steadily(a, ledger, batches=5, size=10) for a in fleet_agents))
    await wait_all_applied(deployment, ledger)
    dsn = deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)
    before = fleet_hash(dsn)

    controller.stop()
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE partition_ownership SET next_offset = 0")
    replayer = deployment.start_controller("replayer")

    async def replayed() -> list[int]:
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT next_offset FROM partition_ownership").fetchall()
        return [r[0] for r in rows]

    # Every partition is read again from offset 0 up to where it was.
    await eventually(replayed, lambda offsets: sum(offsets) >= len(ledger), what="replay done")
    assert replayer.alive()
    assert fleet_hash(dsn) == before
    report = check(ledger, dsn)
    assert report.ok, report


@pytest.mark.parametrize("deployment", [6], indirect=True)
async def test_handover_between_controllers_mid_stream_applies_everything_once_in_order(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    first = deployment.start_controller("first")
    ledger = Ledger()
    fleet_agents = [agents(f"cust-{i}", f"env-{i % 2}", f"agent-{i}") for i in range(6)]
    load = asyncio.gather(
        *(send_steadily(a, ledger, batches=30, size=5, pause_s=0.05) for a in fleet_agents)
    )
    await asyncio.sleep(2)
    deployment.start_controller("second")
    await asyncio.sleep(2)
    first.stop()
    await load
    await wait_all_applied(deployment, ledger, timeout_s=90)
    report = check(ledger, deployment.fleet.stack.admin_dsn(deployment.fleet.database_name))
    assert report.ok, report
    assert report.accepted == 6 * 30 * 5

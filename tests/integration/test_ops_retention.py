"""Retention of event records on the real PostgreSQL, Kafka and controller processes."""

from __future__ import annotations

import asyncio
import urllib.request
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from sqlalchemy import insert

from services.controller.claims import Ownerships
from services.controller.metrics import ControllerMetrics
from services.controller.ownership import take_epoch
from services.controller.retention import RecordPruner
from services.shared.db import create_engine
from services.shared.schema import event_records
from tests.support.deployment import Deployment
from tests.support.processes import ServiceProcess
from tests.support.waiting import eventually

HOUR = 3600.0


def rows(partition: int, count: int, age: timedelta, prefix: str) -> list[dict[str, object]]:
    applied = datetime.now(UTC) - age
    return [
        {
            "customer_id": f"cust-{partition}",
            "agent_id": "agent-1",
            "event_id": f"{prefix}-{i}",
            "environment_id": "prod",
            "event_type": "heartbeat",
            "boot_id": "boot-1",
            "seq": i,
            "status": "applied",
            "partition": partition,
            "offset": i,
            "epoch": 1,
            "accepted_at": applied,
            "applied_at": applied,
        }
        for i in range(count)
    ]


def left(dsn: str) -> dict[tuple[int, str], int]:
    """Rows per (partition, event-id prefix)."""
    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            "SELECT partition, split_part(event_id, '-', 1), count(*) FROM event_records "
            "GROUP BY 1, 2"
        ).fetchall()
    return {(p, prefix): n for p, prefix, n in found}


def pruned_total(metrics: ControllerMetrics) -> float:
    value = metrics.registry.get_sample_value("fleetplane_controller_records_pruned_total")
    return value or 0.0


def fenced_total(metrics: ControllerMetrics) -> float:
    value = metrics.registry.get_sample_value("fleetplane_controller_fenced_writes_total")
    return value or 0.0


async def test_pruning_deletes_only_expired_records_of_owned_partitions_in_chunks(
    deployment: Deployment,
) -> None:
    dsn = deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)
    engine = create_engine(deployment.fleet.database, application_name="prune test")
    metrics = ControllerMetrics()
    try:
        async with engine.begin() as conn:
            for partition in (0, 1):
                await conn.execute(
                    insert(event_records), rows(partition, 10, timedelta(hours=3), "old")
                )
                await conn.execute(
                    insert(event_records), rows(partition, 4, timedelta(minutes=5), "new")
                )
        ownerships = Ownerships(engine, "events", "pruner", metrics)
        await ownerships.claim([0], {0: 0})
        pruner = RecordPruner(engine, ownerships, metrics, retention_s=HOUR, chunk_rows=3)

        assert await pruner.tick() == 10
        assert left(dsn) == {(0, "new"): 4, (1, "old"): 10, (1, "new"): 4}
        assert pruned_total(metrics) == 10
        assert await pruner.tick() == 0  # nothing expired is left
    finally:
        await engine.dispose()


async def test_a_controller_whose_partition_moved_on_prunes_nothing(
    deployment: Deployment,
) -> None:
    dsn = deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)
    engine = create_engine(deployment.fleet.database, application_name="prune test")
    metrics = ControllerMetrics()
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(event_records), rows(0, 5, timedelta(hours=3), "old"))
        zombie = Ownerships(engine, "events", "zombie", metrics)
        await zombie.claim([0], {0: 0})
        async with engine.begin() as conn:
            await take_epoch(conn, "events", 0, "successor")

        pruner = RecordPruner(engine, zombie, metrics, retention_s=HOUR, chunk_rows=100)
        assert await pruner.tick() == 0
        assert left(dsn) == {(0, "old"): 5}
        assert fenced_total(metrics) == 1
        assert zombie.held() == {}  # released: the successor prunes it
    finally:
        await engine.dispose()


async def set_topic_retention(deployment: Deployment, retention_ms: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=deployment.fleet.stack.kafka_bootstrap)
    await admin.start()
    try:
        await admin.alter_configs(
            [
                ConfigResource(
                    ConfigResourceType.TOPIC,
                    deployment.fleet.events_topic,
                    {"retention.ms": str(retention_ms)},
                )
            ]
        )
    finally:
        await admin.close()


def scrape(controller: ServiceProcess) -> str:
    url = controller.health_url.replace("/healthz", "/metrics")
    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode())


async def test_a_running_controller_prunes_on_its_timer(deployment: Deployment) -> None:
    # Kafka keeps this topic 30 minutes; records are kept an hour, past it.
    await set_topic_retention(deployment, 30 * 60 * 1000)
    dsn = deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        for partition in range(deployment.fleet.partitions):
            for row in rows(partition, 3, timedelta(hours=2), "old") + rows(
                partition, 2, timedelta(minutes=1), "new"
            ):
                cur.execute(
                    "INSERT INTO event_records (customer_id, agent_id, event_id, environment_id, "
                    'event_type, boot_id, seq, status, partition, "offset", epoch, accepted_at, '
                    "applied_at) VALUES (%(customer_id)s, %(agent_id)s, %(event_id)s, "
                    "%(environment_id)s, %(event_type)s, %(boot_id)s, %(seq)s, %(status)s, "
                    "%(partition)s, %(offset)s, %(epoch)s, %(accepted_at)s, %(applied_at)s)",
                    row,
                )
    controller = deployment.start_controller(
        "pruner",
        extra_env={
            "FLEETPLANE_CONTROLLER_RECORD_RETENTION_S": str(HOUR),
            "FLEETPLANE_CONTROLLER_PRUNE_INTERVAL_S": "0.5",
        },
    )

    async def expired_left() -> int:
        return sum(n for (_p, prefix), n in left(dsn).items() if prefix == "old")

    await eventually(expired_left, lambda n: n == 0, timeout_s=30, what="expired rows pruned")
    assert sum(left(dsn).values()) == 2 * deployment.fleet.partitions
    metrics = await asyncio.to_thread(scrape, controller)
    expected = 3 * deployment.fleet.partitions
    assert f"fleetplane_controller_records_pruned_total {float(expected)}" in metrics


async def test_a_window_shorter_than_the_topics_retention_refuses_to_start(
    deployment: Deployment,
) -> None:
    await set_topic_retention(deployment, 2 * 3600 * 1000)
    with pytest.raises(RuntimeError, match="exited with 2") as refused:
        deployment.start_controller(
            "short-window", extra_env={"FLEETPLANE_CONTROLLER_RECORD_RETENTION_S": str(HOUR)}
        )
    assert "FLEETPLANE_CONTROLLER_RECORD_RETENTION_S" in str(refused.value)

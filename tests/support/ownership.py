"""Looking at partition ownership from outside: the ownership table, controller pages, Kafka.

For the chaos tests: who owns which partition (PostgreSQL), what a controller
says about itself (``/readyz``, ``/metrics``), where a customer's records go
(Kafka's default partitioner), and how far each partition's log reaches.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.partitioner import murmur2

from services.shared.topics import topic_partitions
from tests.support.deployment import Deployment
from tests.support.processes import ServiceProcess
from tests.support.waiting import eventually


def partition_for(customer: str, partitions: int) -> int:
    """The partition the API's producer picks for ``customer`` (Kafka's default partitioner)."""
    return int(murmur2(customer.encode()) & 0x7FFFFFFF) % partitions


def customers_covering(partitions: int, per_partition: int = 1, prefix: str = "cust") -> list[str]:
    """Customer ids, ``per_partition`` of them on every partition, so every partition is busy."""
    chosen: dict[int, list[str]] = {p: [] for p in range(partitions)}
    i = 0
    while any(len(c) < per_partition for c in chosen.values()):
        customer = f"{prefix}-{i}"
        found = chosen[partition_for(customer, partitions)]
        if len(found) < per_partition:
            found.append(customer)
        i += 1
    return [c for p in range(partitions) for c in chosen[p]]


@dataclass(frozen=True)
class Owner:
    owner: str
    epoch: int
    next_offset: int


def dsn(deployment: Deployment) -> str:
    return deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)


def ownership(deployment: Deployment) -> dict[int, Owner]:
    """The ownership table of the deployment's events topic, by partition."""
    with psycopg.connect(dsn(deployment)) as conn:
        rows = conn.execute(
            "SELECT partition, owner, epoch, next_offset FROM partition_ownership WHERE topic = %s",
            (deployment.fleet.events_topic,),
        ).fetchall()
    return {p: Owner(o, e, n) for p, o, e, n in rows}


def instance_id(deployment: Deployment, name: str) -> str:
    """The ``owner`` a controller started as ``name`` writes (see Deployment.start_controller)."""
    return f"{deployment.fleet.name}-{name}"


def _port(process: ServiceProcess) -> int:
    return int(process.health_url.rsplit(":", 1)[1].split("/", 1)[0])


def readyz(process: ServiceProcess) -> dict[str, Any]:
    """A controller's /readyz body (200 or 503 alike)."""
    url = f"http://127.0.0.1:{_port(process)}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            body: dict[str, Any] = json.loads(reply.read())
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
    return body


def metric(process: ServiceProcess, name: str) -> float:
    """The sum of every sample of ``name`` on a controller's /metrics (0 when absent)."""
    url = f"http://127.0.0.1:{_port(process)}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", line)
        if match:
            total += float(match.group(1))
    return total


def process_state(process: ServiceProcess) -> str:
    """The kernel's state letter for the process: ``T`` while stopped by SIGSTOP."""
    with open(f"/proc/{process.pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def kill9(process: ServiceProcess) -> float:
    """SIGKILL the controller (its process only, as a crash would); returns the time of it."""
    assert process.process is not None
    killed_at = time.monotonic()
    os.kill(process.pid, signal.SIGKILL)
    process.process.wait(10)
    return killed_at


async def log_end_offsets(deployment: Deployment) -> dict[int, int]:
    """The events topic's log-end offset of every partition, as Kafka has it now."""
    return await _offsets(deployment, end=True)


async def log_start_offsets(deployment: Deployment) -> dict[int, int]:
    return await _offsets(deployment, end=False)


async def _offsets(deployment: Deployment, *, end: bool) -> dict[int, int]:
    topic = deployment.fleet.events_topic
    bootstrap = deployment.fleet.stack.kafka_bootstrap
    tps = [TopicPartition(topic, p) for p in await topic_partitions(bootstrap, topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        found = await (consumer.end_offsets(tps) if end else consumer.beginning_offsets(tps))
        return {tp.partition: int(offset) for tp, offset in found.items()}
    finally:
        await consumer.stop()


async def wait_owned(
    deployment: Deployment,
    partitions: Iterable[int],
    *,
    not_by: str | None = None,
    by: str | None = None,
    newer_than: dict[int, int] | None = None,
    timeout_s: float = 30.0,
) -> dict[int, Owner]:
    """Wait until every partition in ``partitions`` has an owner matching the conditions.

    ``newer_than`` maps partitions to epochs the owner's epoch must exceed.
    """
    wanted = set(partitions)

    async def table() -> dict[int, Owner]:
        return await asyncio.to_thread(ownership, deployment)

    def done(rows: dict[int, Owner]) -> bool:
        for p in wanted:
            row = rows.get(p)
            if row is None:
                return False
            if not_by is not None and row.owner == not_by:
                return False
            if by is not None and row.owner != by:
                return False
            if newer_than is not None and row.epoch <= newer_than.get(p, -1):
                return False
        return True

    return await eventually(
        table, done, timeout_s=timeout_s, interval_s=0.05, what=f"partitions {sorted(wanted)} moved"
    )


async def wait_applied_after(
    deployment: Deployment, start: dict[int, Owner], *, timeout_s: float = 30.0
) -> dict[int, Owner]:
    """Wait until every partition in ``start`` stored an offset beyond the one given there."""

    async def table() -> dict[int, Owner]:
        return await asyncio.to_thread(ownership, deployment)

    return await eventually(
        table,
        lambda rows: all(
            p in rows and rows[p].next_offset > row.next_offset for p, row in start.items()
        ),
        timeout_s=timeout_s,
        interval_s=0.05,
        what="records applied after the handover",
    )


async def wait_busy(deployment: Deployment, *, timeout_s: float = 30.0) -> dict[int, Owner]:
    """Wait until every partition of the deployment has applied something."""

    async def table() -> dict[int, Owner]:
        return await asyncio.to_thread(ownership, deployment)

    return await eventually(
        table,
        lambda rows: (
            len(rows) == deployment.fleet.partitions
            and all(r.next_offset > 0 for r in rows.values())
        ),
        timeout_s=timeout_s,
        interval_s=0.1,
        what="every partition applying",
    )


def owned_by(rows: dict[int, Owner], owner: str) -> dict[int, Owner]:
    return {p: r for p, r in rows.items() if r.owner == owner}


def recorded_epochs(deployment: Deployment, event_ids: Iterable[str]) -> dict[str, list[int]]:
    """For each event id, the epochs of the records stored for it (one, if applied once)."""
    ids = list(event_ids)
    with psycopg.connect(dsn(deployment)) as conn:
        rows = conn.execute(
            "SELECT event_id, epoch FROM event_records WHERE event_id = ANY(%s)", (ids,)
        ).fetchall()
    found: dict[str, list[int]] = {i: [] for i in ids}
    for event_id, epoch in rows:
        found[event_id].append(int(epoch))
    return found


async def wait_holds(
    deployment: Deployment, owner: str, *, timeout_s: float = 30.0
) -> dict[int, Owner]:
    """Wait until ``owner`` (an instance id) owns at least one partition; return those."""

    async def mine() -> dict[int, Owner]:
        return owned_by(await asyncio.to_thread(ownership, deployment), owner)

    return await eventually(mine, bool, timeout_s=timeout_s, what=f"{owner} owning partitions")


async def delete_records(deployment: Deployment, partition: int, before: int) -> int:
    """Move the log start of an events partition to ``before``, as retention would; returns it."""
    topic = deployment.fleet.events_topic
    admin = AIOKafkaAdminClient(
        bootstrap_servers=deployment.fleet.stack.kafka_bootstrap, request_timeout_ms=10_000
    )
    await admin.start()
    try:
        done = await admin.delete_records(
            {TopicPartition(topic, partition): RecordsToDelete(before_offset=before)}
        )
    finally:
        await admin.close()
    return int(done[TopicPartition(topic, partition)])


async def wait_settled(
    deployment: Deployment, processes: dict[str, ServiceProcess], *, timeout_s: float = 30.0
) -> dict[int, Owner]:
    """Wait until the group has settled: each controller holds exactly what the table says.

    ``processes`` maps names (as given to Deployment.start_controller) to processes.
    Every partition must be owned by one of them with the epoch that controller
    holds, so no batch prepared before the last rebalance is still about, and each
    of them must hold one at least (else one may not have joined yet).
    """

    async def views() -> tuple[dict[int, Owner], dict[int, tuple[str, int]]]:
        rows = await asyncio.to_thread(ownership, deployment)
        held: dict[int, tuple[str, int]] = {}
        for name, process in processes.items():
            body = await asyncio.to_thread(readyz, process)
            for partition, claim in body["partitions"].items():
                held[int(partition)] = (instance_id(deployment, name), int(claim["epoch"]))
        return rows, held

    def settled(found: tuple[dict[int, Owner], dict[int, tuple[str, int]]]) -> bool:
        rows, held = found
        owners = {owner for owner, _epoch in held.values()}
        return (
            len(rows) == deployment.fleet.partitions
            and all(held.get(p) == (r.owner, r.epoch) for p, r in rows.items())
            and owners == {instance_id(deployment, name) for name in processes}
        )

    rows, _ = await eventually(views, settled, timeout_s=timeout_s, what="the group settled")
    return rows

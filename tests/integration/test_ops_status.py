"""The ops view (CLI, /status, lag gauge) against real controllers, Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.request
from collections import Counter
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer

from tests.support.deployment import Deployment
from tests.support.processes import ServiceProcess
from tests.support.records import encode, heartbeat_record
from tests.support.stack import ROOT
from tests.support.waiting import eventually

CUSTOMERS = 12
EVENTS_EACH = 5


def status(deployment: Deployment, *args: str) -> dict[str, Any]:
    """``python -m services.controller status --json`` with the deployment's settings."""
    result = subprocess.run(
        [sys.executable, "-m", "services.controller", "status", "--json", *args],
        cwd=ROOT,
        env=deployment.fleet.service_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    body: dict[str, Any] = json.loads(result.stdout)
    return body


def get(controller: ServiceProcess, path: str) -> str:
    url = controller.health_url.replace("/healthz", path)
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def lag_gauges(controllers: list[ServiceProcess]) -> list[dict[int, float]]:
    """fleetplane_controller_partition_lag per partition, of each controller."""
    found = []
    for controller in controllers:
        text = get(controller, "/metrics")
        found.append(
            {
                int(partition): float(value)
                for partition, value in re.findall(
                    r'^fleetplane_controller_partition_lag\{partition="(\d+)"\} (\S+)$',
                    text,
                    re.M,
                )
            }
        )
    return found


def lag_gauge(controllers: list[ServiceProcess]) -> dict[int, float]:
    """fleetplane_controller_partition_lag per partition, over every controller."""
    merged: dict[int, float] = {}
    for exported in lag_gauges(controllers):
        assert not merged.keys() & exported.keys(), "two controllers export one partition"
        merged.update(exported)
    return merged


async def produce(deployment: Deployment, first_seq: int, count: int) -> dict[str, int]:
    """``count`` heartbeats per customer; returns the partition Kafka put each customer in."""
    producer = AIOKafkaProducer(
        bootstrap_servers=deployment.fleet.stack.kafka_bootstrap, acks="all"
    )
    await producer.start()
    placed: dict[str, int] = {}
    try:
        for seq in range(first_seq, first_seq + count):
            for customer in range(CUSTOMERS):
                meta = await producer.send_and_wait(
                    deployment.fleet.events_topic,
                    encode(heartbeat_record(f"cust-{customer}", f"ev-{customer}-{seq}", seq)),
                    key=f"cust-{customer}".encode(),
                )
                placed[f"cust-{customer}"] = meta.partition
    finally:
        await producer.stop()
    return placed


def ownership(dsn: str) -> dict[int, tuple[str, int, int]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT partition, owner, epoch, next_offset FROM partition_ownership"
        ).fetchall()
    return {p: (o, e, n) for p, o, e, n in rows}


async def test_status_shows_owners_offsets_customers_and_rate(deployment: Deployment) -> None:
    first = deployment.start_controller("first")
    second = deployment.start_controller("second")
    names = {f"{deployment.fleet.name}-first", f"{deployment.fleet.name}-second"}
    dsn = deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)
    placed = await produce(deployment, 1, EVENTS_EACH)
    total = CUSTOMERS * EVENTS_EACH

    def settled() -> tuple[dict[str, Any], bool]:
        """A report, and whether no rebalance moved anything while it was read."""
        before = ownership(dsn)
        report = status(deployment, "--rate-window", "120")
        return report, before == ownership(dsn)

    report, _ = await eventually(
        lambda: asyncio.to_thread(settled),
        lambda r: (
            r[1]
            and set(r[0]["owners"]) == names  # the group spread the partitions over both
            and r[0]["total_lag"] == 0
            and sum(p["log_end"] for p in r[0]["partitions"]) == total
        ),
        what="everything applied, the group settled",
    )
    table = ownership(dsn)
    per_partition = Counter(placed.values())
    for row in report["partitions"]:
        p = row["partition"]
        assert (row["owner"], row["epoch"], row["stored_offset"]) == table[p]
        assert row["stored_offset"] == row["log_end"] == per_partition[p] * EVENTS_EACH
        assert row["customers"] == per_partition[p]
        assert row["events_per_s"] == round(per_partition[p] * EVENTS_EACH / 120, 1)
    assert report["events_per_s"] == round(total / 120, 1)

    customer = status(deployment, "--customer", "cust-3")["customer"]
    assert customer["partition"] == placed["cust-3"]
    assert customer["owner"] == table[placed["cust-3"]][0]
    assert customer["environments"] == 1

    # Each controller serves the same view, plus what it holds itself.
    for controller, name in ((first, "first"), (second, "second")):
        page = json.loads(await asyncio.to_thread(get, controller, "/status?customer=cust-3"))
        assert page["owners"] == report["owners"]
        assert page["customer"]["partition"] == placed["cust-3"]
        mine = {p for p, (owner, _e, _n) in table.items() if owner.endswith(f"-{name}")}
        assert {int(p) for p in page["instance"]["held"]} == mine

    # Scale in: the survivor owns everything, and the view says so.
    second.stop()
    await eventually(
        lambda: asyncio.to_thread(status, deployment),
        lambda r: set(r["owners"]) == {f"{deployment.fleet.name}-first"},
        what="the survivor owns every partition",
    )
    page = json.loads(await asyncio.to_thread(get, first, "/status"))
    assert len(page["instance"]["held"]) == deployment.fleet.partitions


async def test_lag_rises_while_applying_is_blocked_and_falls_after(
    deployment: Deployment,
) -> None:
    controllers = [deployment.start_controller("first"), deployment.start_controller("second")]
    dsn = deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)
    await produce(deployment, 1, 1)
    # Settled: both controllers own partitions (the join's rebalance is over), all applied.
    await eventually(
        lambda: asyncio.to_thread(lag_gauges, controllers),
        lambda each: (
            all(each)
            and sum(len(e) for e in each) == deployment.fleet.partitions
            and sum(sum(e.values()) for e in each) == 0
        ),
        what="every partition exported by its owner, with no lag",
    )

    # Holding the ownership rows blocks every apply transaction at its fence.
    with psycopg.connect(dsn) as blocker:
        blocker.execute("SELECT * FROM partition_ownership FOR UPDATE")
        placed = await produce(deployment, 2, 2)
        behind = {p: 2 * n for p, n in Counter(placed.values()).items()}
        lag = await eventually(
            lambda: asyncio.to_thread(lag_gauge, controllers),
            lambda lag: {p: v for p, v in lag.items() if v} == behind,
            what="lag gauge shows the blocked records",
        )
        assert sum(lag.values()) == 2 * CUSTOMERS
        report = await asyncio.to_thread(status, deployment)
        assert report["total_lag"] == 2 * CUSTOMERS
        assert {p["partition"]: p["lag"] for p in report["partitions"] if p["lag"]} == behind
        blocker.rollback()

    await eventually(
        lambda: asyncio.to_thread(lag_gauge, controllers),
        lambda lag: sum(lag.values()) == 0,
        what="lag back to zero",
    )
    assert (await asyncio.to_thread(status, deployment))["total_lag"] == 0


def test_status_says_why_when_the_topic_is_missing(deployment: Deployment) -> None:
    env = {**deployment.fleet.service_env(), "FLEETPLANE_EVENTS_TOPIC": "no.such.topic"}
    result = subprocess.run(
        [sys.executable, "-m", "services.controller", "status"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "topic no.such.topic does not exist" in result.stderr

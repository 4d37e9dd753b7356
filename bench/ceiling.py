"""Section ``ceiling``: what one controller can carry.

- ``apply_events_per_s``: one controller applying a pre-filled topic into
  PostgreSQL (no HTTP), measured from the first to the last applied transaction.

What the edge and the API accept is the ``accept`` section's (bench/accept.py).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer

from tests.support.deployment import Deployment
from tests.support.records import encode, heartbeat_record
from tests.support.stack import FleetEnv, Stack, prepare_template

APPLY_EVENTS = 60_000
APPLY_CUSTOMERS = 200
RUNS = 3


async def _prefill(deployment: Deployment) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=deployment.fleet.stack.kafka_bootstrap, acks="all", linger_ms=20
    )
    await producer.start()
    try:
        pending = []
        per_customer = APPLY_EVENTS // APPLY_CUSTOMERS
        for seq in range(1, per_customer + 1):
            for customer in range(APPLY_CUSTOMERS):
                pending.append(
                    await producer.send(
                        deployment.fleet.events_topic,
                        encode(heartbeat_record(f"cust-{customer}", f"ev-{customer}-{seq}", seq)),
                        key=f"cust-{customer}".encode(),
                    )
                )
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def _applied_window(dsn: str) -> tuple[int, float]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*), extract(epoch FROM max(applied_at) - min(applied_at)) "
            "FROM event_records"
        ).fetchone()
    assert row is not None
    return int(row[0]), float(row[1] or 0.0)


def apply_once(stack: Stack, log_dir: Path) -> float:
    deployment = Deployment(FleetEnv.new(stack, partitions=12), log_dir).create()
    try:
        asyncio.run(_prefill(deployment))
        deployment.start_controller("bench")
        dsn = stack.admin_dsn(deployment.fleet.database_name)
        deadline = time.monotonic() + 600
        while True:
            count, window = _applied_window(dsn)
            if count >= APPLY_EVENTS:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {count} of {APPLY_EVENTS} applied")
            time.sleep(0.5)
        return APPLY_EVENTS / window
    finally:
        deployment.close()


def run(stack: Stack) -> tuple[dict[str, Any], dict[str, Any]]:
    prepare_template(stack)
    log_dir = stack.run_dir / "bench-logs"
    apply_rates = []
    for i in range(RUNS):
        print(f"  ceiling run {i + 1}/{RUNS}: apply", flush=True)
        apply_rates.append(apply_once(stack, log_dir))
    figures = {
        "apply_events_per_s": round(statistics.median(apply_rates), 1),
        "apply_events_per_s_runs": [round(r, 1) for r in apply_rates],
    }
    parameters = {
        "runs": RUNS,
        "apply_events": APPLY_EVENTS,
        "apply_customers": APPLY_CUSTOMERS,
        "topic_partitions": 12,
        "controllers": 1,
    }
    return figures, parameters

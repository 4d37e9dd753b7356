"""Section ``ceiling``: what one controller can carry.

- ``apply_events_per_s``: one controller applying a pre-filled topic of heartbeats
  (12 partitions, 200 customers) into PostgreSQL (no HTTP), measured from the first
  to the last applied transaction; ``apply_mixed_events_per_s`` the same with the
  ``MIX`` of event types; ``apply_one_partition_events_per_s`` one hot customer
  alone; the medians of the controller's batch-size and apply-duration histograms;
- ``apply_db_only_events_per_s``: the same heartbeat batches through the same SQL
  (``store.apply_batch``) in a plain loop from memory, the database's share alone,
  and ``apply_vs_db_only``, the controller's rate over it.

What the edge and the API accept is the ``accept`` section's (bench/accept.py).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.ext.asyncio import create_async_engine

from services.controller.handlers import Decoded, DecodedChange, Delivered, Poison, decode
from services.controller.ownership import Claim, take_epoch
from services.controller.store import BatchPart, apply_batch
from services.shared import metrics as m
from tests.support.deployment import Deployment
from tests.support.records import (
    command_result_record,
    encode,
    heartbeat_record,
    observed_state_record,
)
from tests.support.stack import FleetEnv, Stack, prepare_template

APPLY_EVENTS = 60_000
APPLY_CUSTOMERS = 200
"""At least 48 customers, so every one of the 12 partitions holds several."""
PARTITIONS = 12
MIX = (("heartbeat", 16), ("observed_state", 3), ("command_result", 1))
"""The mixed workload, in twentieths: 80 % heartbeats, 15 % observed-state reports,
5 % command results (of commands the controller never issued: recorded, rejected)."""
OBSERVED_RESOURCES = 20
MIXED_EVENTS = 30_000
"""Half the heartbeat run: the section stays under about five minutes."""
ONE_PARTITION_EVENTS = 12_000
"""One hot customer alone, so one partition: that partition's ceiling."""
BATCH_MAX = 500
"""The controller's default ``batch_max_records``; the database-only loop batches alike."""
RUNS = 3

Workload = list[tuple[str, dict[str, Any]]]
"""(customer id, record as JSON) in the order they are produced."""


def heartbeats(events: int = APPLY_EVENTS, customers: int = APPLY_CUSTOMERS) -> Workload:
    """Each customer's agent sends ``events / customers`` heartbeats, customers interleaved."""
    out: Workload = []
    for seq in range(1, events // customers + 1):
        for c in range(customers):
            out.append((f"cust-{c}", heartbeat_record(f"cust-{c}", f"ev-{c}-{seq}", seq)))
    return out


def mixed(events: int = APPLY_EVENTS, customers: int = APPLY_CUSTOMERS) -> Workload:
    """``MIX`` of event types, each customer's sequence numbers contiguous."""
    kinds = [kind for kind, twentieths in MIX for _ in range(twentieths)]
    resources = [
        {"kind": "deployment", "name": f"svc-{i}", "version": "1.0.0", "status": "running"}
        for i in range(OBSERVED_RESOURCES)
    ]
    out: Workload = []
    for seq in range(1, events // customers + 1):
        for c in range(customers):
            customer, event_id = f"cust-{c}", f"ev-{c}-{seq}"
            kind = kinds[(seq + c) % len(kinds)]
            if kind == "heartbeat":
                record = heartbeat_record(customer, event_id, seq)
            elif kind == "observed_state":
                record = observed_state_record(customer, event_id, seq, resources)
            else:
                record = command_result_record(customer, event_id, seq, command_id=10**9 + seq)
            out.append((customer, record))
    return out


async def _prefill(deployment: Deployment, workload: Workload) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=deployment.fleet.stack.kafka_bootstrap, acks="all", linger_ms=20
    )
    await producer.start()
    try:
        pending = [
            await producer.send(
                deployment.fleet.events_topic, encode(record), key=customer.encode()
            )
            for customer, record in workload
        ]
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


def histogram_median(metrics_text: str, name: str) -> float | None:
    """The median of a Prometheus histogram, interpolated in its bucket as PromQL does."""
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = buckets[-1][1] / 2
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(
                count - lower_count, 1e-9
            )
        lower_bound, lower_count = bound, count
    return None


@dataclass(frozen=True, slots=True)
class ApplyRun:
    events_per_s: float
    batch_size_median: float | None
    apply_duration_median_s: float | None


def apply_once(
    stack: Stack, log_dir: Path, workload: Workload | None = None, env: dict[str, str] | None = None
) -> ApplyRun:
    """One controller applying ``workload`` (heartbeats by default) from a pre-filled topic."""
    workload = heartbeats() if workload is None else workload
    deployment = Deployment(FleetEnv.new(stack, partitions=PARTITIONS), log_dir).create()
    try:
        asyncio.run(_prefill(deployment, workload))
        controller = deployment.start_controller("bench", extra_env=env)
        dsn = stack.admin_dsn(deployment.fleet.database_name)
        deadline = time.monotonic() + 600
        while True:
            count, window = _applied_window(dsn)
            if count >= len(workload):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {count} of {len(workload)} applied")
            time.sleep(0.5)
        metrics_url = controller.health_url.rsplit("/", 1)[0] + "/metrics"
        # An http URL on 127.0.0.1 built from the controller we started, not user input.
        with urllib.request.urlopen(metrics_url, timeout=10) as response:  # noqa: S310
            metrics_text = response.read().decode()
        return ApplyRun(
            len(workload) / window,
            histogram_median(metrics_text, m.CONTROLLER_BATCH_SIZE.name),
            histogram_median(metrics_text, m.CONTROLLER_BATCH_DURATION.name),
        )
    finally:
        deployment.close()


def _batches(workload: Workload, claims: dict[int, Claim]) -> list[list[BatchPart]]:
    """The workload decoded from memory and cut as the controller's consumer cuts it.

    Each batch gives every partition with records ``BATCH_MAX / partitions`` first,
    then fills up from any partition (``PartitionConsumer._next_batch``).
    """
    partitioner = DefaultPartitioner()
    queues: dict[int, list[Decoded | DecodedChange]] = {p: [] for p in sorted(claims)}
    offsets = dict.fromkeys(claims, 0)
    for customer, record in workload:
        key = customer.encode()
        partition = partitioner(key, sorted(claims), sorted(claims))
        decoded = decode(Delivered(partition, offsets[partition], key, encode(record)))
        if isinstance(decoded, Poison):
            raise AssertionError(f"bench record refused: {decoded}")
        queues[partition].append(decoded)
        offsets[partition] += 1
    taken = dict.fromkeys(claims, 0)
    share = max(BATCH_MAX // len(claims), 1)
    batches: list[list[BatchPart]] = []
    while any(taken[p] < len(q) for p, q in queues.items()):
        counts = {p: min(share, len(q) - taken[p]) for p, q in queues.items()}
        room = BATCH_MAX - sum(counts.values())
        for p, q in queues.items():
            extra = min(room, len(q) - taken[p] - counts[p])
            counts[p] += extra
            room -= extra
        batch = []
        for p, n in counts.items():
            if n:
                part = queues[p][taken[p] : taken[p] + n]
                taken[p] += n
                batch.append(BatchPart(claims[p], part, taken[p]))
        batches.append(batch)
    return batches


async def _db_only(dsn: str, topic: str, workload: Workload) -> float:
    engine = create_async_engine(
        "postgresql+psycopg://", connect_args=dict(conninfo_to_dict(dsn)), pool_size=1
    )
    try:
        async with engine.begin() as conn:
            claims = {
                p: await take_epoch(conn, topic, p, "bench-db-only") for p in range(PARTITIONS)
            }
        batches = _batches(workload, claims)
        started = time.perf_counter()
        for batch in batches:
            async with engine.begin() as conn:
                await apply_batch(conn, batch, ack_timeout_s=30.0)
        return len(workload) / (time.perf_counter() - started)
    finally:
        await engine.dispose()


def db_only_once(stack: Stack, log_dir: Path, workload: Workload | None = None) -> float:
    """The database's share alone: the controller's statements, from memory, in a plain loop.

    The same rows, batches and SQL (``store.apply_batch``) as a controller applying
    the pre-filled topic, without Kafka, faust or the consumer: records are decoded
    before the clock starts; planning each batch is inside it, as in the controller.
    """
    workload = heartbeats() if workload is None else workload
    deployment = Deployment(FleetEnv.new(stack, partitions=PARTITIONS), log_dir).create()
    try:
        dsn = stack.admin_dsn(deployment.fleet.database_name)
        return asyncio.run(_db_only(dsn, deployment.fleet.events_topic, workload))
    finally:
        deployment.close()


def run(stack: Stack) -> tuple[dict[str, Any], dict[str, Any]]:
    prepare_template(stack)
    log_dir = stack.run_dir / "bench-logs"
    beats, mix = heartbeats(), mixed(MIXED_EVENTS)
    one_customer = heartbeats(ONE_PARTITION_EVENTS, 1)
    apply_runs: list[ApplyRun] = []
    mixed_rates: list[float] = []
    one_partition_rates: list[float] = []
    db_only_rates: list[float] = []
    # Interleaved, so a burst of load from elsewhere on the machine lands on every
    # figure rather than on one.
    for i in range(RUNS):
        print(f"  ceiling run {i + 1}/{RUNS}: apply", flush=True)
        apply_runs.append(apply_once(stack, log_dir, beats))
        print(f"  ceiling run {i + 1}/{RUNS}: apply, database only", flush=True)
        db_only_rates.append(db_only_once(stack, log_dir, beats))
        print(f"  ceiling run {i + 1}/{RUNS}: apply, mixed", flush=True)
        mixed_rates.append(apply_once(stack, log_dir, mix).events_per_s)
        print(f"  ceiling run {i + 1}/{RUNS}: apply, one partition", flush=True)
        one_partition_rates.append(apply_once(stack, log_dir, one_customer).events_per_s)
    apply_rates = [r.events_per_s for r in apply_runs]
    apply_median = statistics.median(apply_rates)
    db_only_median = statistics.median(db_only_rates)
    batch_sizes = [r.batch_size_median for r in apply_runs if r.batch_size_median is not None]
    durations = [
        r.apply_duration_median_s for r in apply_runs if r.apply_duration_median_s is not None
    ]
    figures = {
        "apply_events_per_s": round(apply_median, 1),
        "apply_events_per_s_runs": [round(r, 1) for r in apply_rates],
        "apply_mixed_events_per_s": round(statistics.median(mixed_rates), 1),
        "apply_mixed_events_per_s_runs": [round(r, 1) for r in mixed_rates],
        "apply_one_partition_events_per_s": round(statistics.median(one_partition_rates), 1),
        "apply_one_partition_events_per_s_runs": [round(r, 1) for r in one_partition_rates],
        "apply_db_only_events_per_s": round(db_only_median, 1),
        "apply_db_only_events_per_s_runs": [round(r, 1) for r in db_only_rates],
        "apply_vs_db_only": round(apply_median / db_only_median, 3),
        "apply_batch_size_median": round(statistics.median(batch_sizes), 1)
        if batch_sizes
        else None,
        "apply_duration_median_ms": round(statistics.median(durations) * 1000, 2)
        if durations
        else None,
    }
    parameters = {
        "runs": RUNS,
        "apply_events": APPLY_EVENTS,
        "apply_customers": APPLY_CUSTOMERS,
        "apply_mixed_events": MIXED_EVENTS,
        "apply_mix_twentieths": dict(MIX),
        "apply_observed_resources": OBSERVED_RESOURCES,
        "apply_one_partition_events": ONE_PARTITION_EVENTS,
        "apply_batch_max_records": BATCH_MAX,
        "topic_partitions": PARTITIONS,
        "controllers": 1,
    }
    return figures, parameters

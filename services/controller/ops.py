"""The ops view of the consumer group: per partition, who owns it and how it is doing.

Read-only. PostgreSQL's ownership table says who holds each partition (owner,
epoch, stored offset); Kafka says where each partition's log starts and ends. The
two are joined here, for ``python -m services.controller status`` and for the
``/status`` page every controller serves.

A customer's partition is computed as Kafka's default partitioner does it
(murmur2 of the key, the customer id), so it is known even before the customer's
first event was applied.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.shared.schema import environments, event_records, partition_ownership

RATE_WINDOW_S = 10.0
"""Events/s is the number of events applied in this many seconds before now, divided."""

_partitioner = DefaultPartitioner()


def partition_of(customer_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (the API's producer) gives this customer."""
    all_partitions = list(range(partitions))
    return int(_partitioner(customer_id.encode(), all_partitions, all_partitions))


class CustomerPartitions:
    """Customer → partition, remembered: murmur2 in Python is slow enough to matter.

    The set of customers only grows, so a controller serving ``/status`` hashes each
    one once instead of on every request.
    """

    def __init__(self) -> None:
        self._known: dict[tuple[str, int], int] = {}

    def count(self, customers: Iterable[str], partitions: int) -> Counter[int]:
        counts: Counter[int] = Counter()
        for customer in customers:
            key = (customer, partitions)
            partition = self._known.get(key)
            if partition is None:
                partition = self._known[key] = partition_of(customer, partitions)
            counts[partition] += 1
        return counts


@dataclass(frozen=True, slots=True)
class LogOffsets:
    """Where each partition's log starts (oldest kept record) and ends (next offset)."""

    start: dict[int, int]
    end: dict[int, int]


async def topic_partitions(bootstrap: str, topic: str) -> list[int]:
    """The topic's partition ids, from the broker's metadata.

    Raises LookupError when the topic does not exist.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for d in described:
        if d["topic"] == topic and not d["error_code"] and d["partitions"]:
            return sorted(int(p["partition"]) for p in d["partitions"])
    raise LookupError(f"topic {topic} does not exist")


async def read_log_offsets(bootstrap: str, topic: str, *, timeout_s: float = 10.0) -> LogOffsets:
    """Ask Kafka for the topic's log-start and log-end offsets of every partition.

    Uses a consumer without a group, so it joins nothing and commits nothing. Raises
    LookupError when the topic does not exist, TimeoutError when Kafka does not answer.
    """
    async with asyncio.timeout(timeout_s):
        partitions = await topic_partitions(bootstrap, topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        request_timeout_ms=int(timeout_s * 1000),
    )
    async with asyncio.timeout(timeout_s):
        await consumer.start()
    try:
        async with asyncio.timeout(timeout_s):
            tps = [TopicPartition(topic, p) for p in partitions]
            start = await consumer.beginning_offsets(tps)
            end = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return LogOffsets(
        {tp.partition: int(o) for tp, o in start.items()},
        {tp.partition: int(o) for tp, o in end.items()},
    )


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    partition: int
    owner: str | None
    """Who took the last epoch; None if no controller ever owned the partition."""
    epoch: int | None
    stored_offset: int | None
    """The next offset to apply, stored with the effects; None if never owned."""
    log_start: int
    log_end: int
    lag: int
    """Records not applied yet: log end minus the stored offset (or the log start)."""
    customers: int
    events_per_s: float
    assigned_at: datetime | None
    updated_at: datetime | None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class CustomerStatus:
    customer_id: str
    partition: int
    owner: str | None
    epoch: int | None
    lag: int
    environments: int
    """Environments of this customer the fleet tables know (0: none applied yet)."""


@dataclass(frozen=True, slots=True)
class StatusReport:
    topic: str
    taken_at: datetime
    """The database's clock when the report was read."""
    rate_window_s: float
    partitions: list[PartitionStatus]
    customer: CustomerStatus | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """What the caller adds (the serving controller's own view on ``/status``)."""

    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def events_per_s(self) -> float:
        return round(sum(p.events_per_s for p in self.partitions), 1)

    def owners(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        for p in self.partitions:
            if p.owner is not None:
                found.setdefault(p.owner, []).append(p.partition)
        return found

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "topic": self.topic,
            "taken_at": self.taken_at.isoformat(),
            "rate_window_s": self.rate_window_s,
            "total_lag": self.total_lag,
            "events_per_s": self.events_per_s,
            "owners": self.owners(),
            "partitions": [
                {
                    **asdict(p),
                    "assigned_at": p.assigned_at.isoformat() if p.assigned_at else None,
                    "updated_at": p.updated_at.isoformat() if p.updated_at else None,
                }
                for p in self.partitions
            ],
        }
        if self.customer is not None:
            body["customer"] = asdict(self.customer)
        body.update(self.extra)
        return body


async def collect_status(
    conn: AsyncConnection,
    topic: str,
    offsets: LogOffsets,
    *,
    customer: str | None = None,
    rate_window_s: float = RATE_WINDOW_S,
    customer_partitions: CustomerPartitions | None = None,
) -> StatusReport:
    """Join the ownership table, Kafka's offsets and the fleet tables per partition.

    Three cheap reads: the ownership rows, the distinct customers of ``environments``
    (its primary key leads with customer_id) and the events applied in the rate
    window (the ``applied_at`` index).
    """
    now = (await conn.execute(select(func.now()))).scalar_one()
    owned = {
        r.partition: r
        for r in await conn.execute(
            select(partition_ownership).where(partition_ownership.c.topic == topic)
        )
    }
    count = len(offsets.end)
    customers = (customer_partitions or CustomerPartitions()).count(
        (r[0] for r in await conn.execute(select(environments.c.customer_id).distinct())), count
    )
    recent = {
        r.partition: int(r.events)
        for r in await conn.execute(
            select(event_records.c.partition, func.count().label("events"))
            .where(
                event_records.c.applied_at
                > func.now() - func.make_interval(0, 0, 0, 0, 0, 0, rate_window_s)
            )
            .group_by(event_records.c.partition)
        )
    }
    rows: list[PartitionStatus] = []
    for partition in sorted(offsets.end):
        start, end = offsets.start.get(partition, 0), offsets.end[partition]
        row = owned.get(partition)
        problem = None
        if row is None:
            stored = None
            lag = end - start
        else:
            stored = int(row.next_offset)
            # Stored 0 means nothing applied yet: the owner starts at the log start.
            lag = end - (start if stored == 0 else stored)
            if 0 < stored < start:
                problem = f"stored offset {stored} is below the log start {start}"
        rows.append(
            PartitionStatus(
                partition=partition,
                owner=None if row is None else row.owner,
                epoch=None if row is None else int(row.epoch),
                stored_offset=stored,
                log_start=start,
                log_end=end,
                lag=max(lag, 0),
                customers=customers.get(partition, 0),
                events_per_s=round(recent.get(partition, 0) / rate_window_s, 1),
                assigned_at=None if row is None else row.assigned_at,
                updated_at=None if row is None else row.updated_at,
                problem=problem,
            )
        )
    found = None
    if customer is not None:
        found = await _customer(conn, customer, rows)
    return StatusReport(topic, now, rate_window_s, rows, found)


async def _customer(
    conn: AsyncConnection, customer: str, rows: list[PartitionStatus]
) -> CustomerStatus:
    partition = partition_of(customer, len(rows))
    row = rows[partition]
    envs = (
        await conn.execute(select(func.count()).where(environments.c.customer_id == customer))
    ).scalar_one()
    return CustomerStatus(customer, partition, row.owner, row.epoch, row.lag, int(envs))


def render(report: StatusReport) -> str:
    """The report as a plain-text table for a terminal."""
    owners = report.owners()
    lines = [
        f"{report.topic}: {len(report.partitions)} partitions, {len(owners)} owner(s), "
        f"lag {report.total_lag}, {report.events_per_s} events/s "
        f"(last {report.rate_window_s:.0f} s), at {report.taken_at:%Y-%m-%d %H:%M:%S %Z}",
    ]
    header = (
        "part", "owner", "epoch", "stored", "log end", "lag", "customers", "ev/s", "owned", "wrote",
    )  # fmt: skip
    table = [header]
    for p in report.partitions:
        table.append(
            (
                str(p.partition),
                p.owner or "-",
                "-" if p.epoch is None else str(p.epoch),
                "-" if p.stored_offset is None else str(p.stored_offset),
                str(p.log_end),
                str(p.lag),
                str(p.customers),
                f"{p.events_per_s:.1f}",
                _age(report.taken_at, p.assigned_at),
                _age(report.taken_at, p.updated_at),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for p in report.partitions:
        if p.problem:
            lines.append(f"! partition {p.partition}: {p.problem}")
    if report.customer is not None:
        c = report.customer
        lines.append(
            f"customer {c.customer_id}: partition {c.partition}, owner {c.owner or '-'}"
            f" (epoch {'-' if c.epoch is None else c.epoch}), lag {c.lag}, "
            f"{c.environments} environment(s) known"
        )
    return "\n".join(lines)


def _age(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "-"
    seconds = max(int((now - then).total_seconds()), 0)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"

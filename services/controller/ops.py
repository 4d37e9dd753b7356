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
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.shared.kafka_admin import kafka_admin
from services.shared.kafka_admin import topic_partitions as shared_topic_partitions
from services.shared.schema import environments, event_records, partition_ownership
from services.shared.settings import KafkaSettings

logger = logging.getLogger(__name__)

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

    def partition(self, customer: str, partitions: int) -> int:
        key = (customer, partitions)
        partition = self._known.get(key)
        if partition is None:
            partition = self._known[key] = partition_of(customer, partitions)
        return partition

    def count(self, customers: Iterable[str], partitions: int) -> Counter[int]:
        return Counter(self.partition(customer, partitions) for customer in customers)


LIVENESS_STATES = ("connected", "unknown", "lost", "never_seen")
"""The operator API's liveness states (services/api/models.py Liveness)."""


async def count_environments(
    conn: AsyncConnection, *, connected_s: float, lost_s: float
) -> list[tuple[str, str, int]]:
    """(customer, liveness, environments) for every customer, liveness as the API derives it.

    The heartbeat's age is taken on the database's clock, as the API's reads are; a
    heartbeat stamped slightly in the future counts as connected, as there.
    """
    heartbeat = environments.c.last_heartbeat_at
    age = func.now() - heartbeat
    state = case(
        (heartbeat.is_(None), "never_seen"),
        (age <= timedelta(seconds=connected_s), "connected"),
        (age <= timedelta(seconds=lost_s), "unknown"),
        else_="lost",
    ).label("liveness")
    rows = await conn.execute(
        select(environments.c.customer_id, state, func.count()).group_by(
            environments.c.customer_id, state
        )
    )
    return [(str(c), str(s), int(n)) for c, s, n in rows]


def liveness_of_owned(
    counts: Iterable[tuple[str, str, int]],
    owned: Iterable[int],
    partitions: int,
    customer_partitions: CustomerPartitions,
) -> dict[tuple[str, str], int]:
    """The (customer, liveness) -> environments of the customers whose partition is owned.

    Every state of such a customer is present, 0 included, so a series does not vanish
    when its last environment changes state.
    """
    held = set(owned)
    gauges: dict[tuple[str, str], int] = {}
    for customer, liveness, n in counts:
        if customer_partitions.partition(customer, partitions) not in held:
            continue
        for state in LIVENESS_STATES:
            gauges.setdefault((customer, state), 0)
        gauges[(customer, liveness)] += n
    return gauges


@dataclass(slots=True)
class _Pending:
    offset: int
    """The stored offset while this record waits: the partition's oldest unapplied one."""
    since_s: float
    warned: bool = False


class StallTracker:
    """The age of each held partition's oldest record that exists but is not applied.

    The record at the stored offset is the oldest one not applied. Once fetched its
    Kafka timestamp says how old it is; before that, the first moment it was seen to
    exist (log end beyond the stored offset) is a lower bound. The age falls to 0 when
    nothing waits, and restarts whenever the stored offset moves: a partition that
    keeps applying never looks stalled however long its lag lasts, one that stops
    does within one refresh. A stall past ``warn_after_s`` is logged once.
    """

    def __init__(self, warn_after_s: float, owner: str) -> None:
        self._warn_after_s = warn_after_s
        self._owner = owner
        self._pending: dict[int, _Pending] = {}

    def observe(
        self,
        topic: str,
        partition: int,
        next_offset: int,
        log_end: int | None,
        now_s: float,
        fetched: tuple[int, float] | None = None,
    ) -> float:
        """The age in seconds; ``fetched`` is (offset, Kafka timestamp) of a fetched record."""
        if log_end is None or log_end <= next_offset:
            self._pending.pop(partition, None)
            return 0.0
        known = self._pending.get(partition)
        if known is None or known.offset != next_offset:
            known = self._pending[partition] = _Pending(next_offset, now_s)
        if fetched is not None and fetched[0] == next_offset:
            known.since_s = min(known.since_s, fetched[1])
        age = max(now_s - known.since_s, 0.0)
        if age >= self._warn_after_s and not known.warned:
            known.warned = True
            logger.warning(
                "%s[%d] has not advanced for %.0f s: owner %s, stored offset %d, log end %d",
                topic,
                partition,
                age,
                self._owner,
                next_offset,
                log_end,
            )
        return age

    def forget(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._pending.pop(partition, None)


@dataclass(frozen=True, slots=True)
class LogOffsets:
    """Where each partition's log starts (oldest kept record) and ends (next offset)."""

    start: dict[int, int]
    end: dict[int, int]


async def topic_partitions(bootstrap: str, topic: str) -> list[int]:
    """The topic's partition ids, from the broker's metadata.

    Raises LookupError (``TopicNotFound``) when the topic does not exist.
    """
    async with kafka_admin(bootstrap) as admin:
        return await shared_topic_partitions(admin, topic)


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


async def read_record_times(
    bootstrap: str, topic: str, positions: Mapping[int, int], *, timeout_s: float = 5.0
) -> dict[int, float]:
    """Kafka's timestamp (epoch seconds) of the record at each partition's given offset.

    For the oldest pending record of lagging partitions. A consumer without a group
    fetches one record per partition; partitions whose record is not there (deleted,
    or not fetched within ``timeout_s``) are absent from the result.
    """
    if not positions:
        return {}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="none",
        request_timeout_ms=int(timeout_s * 1000),
    )
    found: dict[int, float] = {}
    async with asyncio.timeout(timeout_s):
        await consumer.start()
    try:
        tps = {TopicPartition(topic, p): offset for p, offset in positions.items()}
        consumer.assign(list(tps))
        for tp, offset in tps.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while len(found) < len(tps) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=len(tps))
            for tp, records in batches.items():
                for record in records:
                    if record.offset == tps[tp] and record.timestamp is not None:
                        found[tp.partition] = record.timestamp / 1000
                consumer.pause(tp)
    except Exception as e:  # the ages are extra detail: the status stands without them
        logger.info("status: could not read pending record times: %r", e)
    finally:
        await consumer.stop()
    return found


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
    pending_age_s: float | None = None
    """Age of the oldest record not applied yet (the record at the stored offset), from its
    Kafka timestamp; 0 without lag, None when it could not be read."""


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


@dataclass
class StatusReader:
    """Reads ``collect_status`` with Kafka's log offsets and record times as they are
    now: what the ``status`` command and the controllers' ``/status`` page both show."""

    engine: AsyncEngine
    kafka: KafkaSettings
    customers: CustomerPartitions = field(default_factory=CustomerPartitions)

    async def read(
        self, customer: str | None = None, rate_window_s: float = RATE_WINDOW_S
    ) -> StatusReport:
        topic = self.kafka.events_topic
        offsets = await read_log_offsets(self.kafka.kafka_bootstrap, topic)
        async with self.engine.connect() as conn:
            return await collect_status(
                conn,
                topic,
                offsets,
                customer=customer,
                rate_window_s=rate_window_s,
                customer_partitions=self.customers,
                record_times=partial(read_record_times, self.kafka.kafka_bootstrap, topic),
            )


async def collect_status(
    conn: AsyncConnection,
    topic: str,
    offsets: LogOffsets,
    *,
    customer: str | None = None,
    rate_window_s: float = RATE_WINDOW_S,
    customer_partitions: CustomerPartitions | None = None,
    record_times: Callable[[Mapping[int, int]], Awaitable[Mapping[int, float]]] | None = None,
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
    if record_times is not None:
        rows = await _with_pending_ages(rows, now, record_times)
    found = None
    if customer is not None:
        found = await _customer(conn, customer, rows)
    return StatusReport(topic, now, rate_window_s, rows, found)


async def _with_pending_ages(
    rows: list[PartitionStatus],
    now: datetime,
    record_times: Callable[[Mapping[int, int]], Awaitable[Mapping[int, float]]],
) -> list[PartitionStatus]:
    oldest = {
        r.partition: r.log_end - r.lag for r in rows if r.lag > 0
    }  # the stored offset, or the log start when nothing was applied yet
    times = await record_times(oldest) if oldest else {}
    aged = []
    for r in rows:
        if r.lag == 0:
            age: float | None = 0.0
        elif r.partition in times:
            age = round(max(now.timestamp() - times[r.partition], 0.0), 1)
        else:
            age = None
        aged.append(replace(r, pending_age_s=age))
    return aged


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
        "part", "owner", "epoch", "stored", "log end", "lag", "pending", "customers", "ev/s",
        "owned", "wrote",
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
                "-" if p.pending_age_s is None else _seconds(p.pending_age_s),
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
    return _seconds((now - then).total_seconds())


def _seconds(age_s: float) -> str:
    seconds = max(int(age_s), 0)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"

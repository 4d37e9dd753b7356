"""Retention of event records: the deduplication keys are pruned after a window.

``event_records`` grows with every applied event; its rows matter for as long as
the same record can be delivered again. Kafka deletes records after the topic's
retention, so keys older than that can never be matched again and are pruned.
The window must therefore exceed the topic's retention; ``retention_problem``
checks it at start.

Pruning is a fleet write like any other: each controller prunes only the rows of
the partitions it owns, each chunk in its own transaction behind the ownership
fence (a share lock on the ownership row, as the command timer takes), so a paused
controller whose partition moved on deletes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import KW_ONLY, dataclass

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.controller.claims import Ownerships
from services.controller.failures import is_back_pressure
from services.controller.metrics import ControllerMetrics
from services.controller.ownership import FencedError, check_fenced
from services.shared.schema import event_records

logger = logging.getLogger(__name__)


async def prune_expired(
    conn: AsyncConnection, *, partition: int, retention_s: float, limit: int
) -> int:
    """Delete up to ``limit`` event records of ``partition`` applied before the window.

    Compares with the database's clock, which stamped ``applied_at``. Runs in the
    caller's transaction; returns the number of rows deleted.
    """
    key_columns = [column for column in event_records.primary_key.columns]
    expired = (
        select(*key_columns)
        .where(
            event_records.c.partition == partition,
            event_records.c.applied_at
            < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, retention_s),
        )
        .limit(limit)
    )
    result = await conn.execute(delete(event_records).where(tuple_(*key_columns).in_(expired)))
    return int(result.rowcount)


@dataclass
class RecordPruner:
    """Prunes expired event records of the partitions held in ``ownerships``."""

    engine: AsyncEngine
    ownerships: Ownerships
    metrics: ControllerMetrics
    _: KW_ONLY
    retention_s: float
    chunk_rows: int
    max_chunks_per_partition: int = 20
    """A backlog (the first run after an outage) is worked off over several ticks
    instead of one long burst competing with the apply transactions."""

    async def tick(self) -> int:
        """One pruning round over the held partitions; returns the rows deleted.

        A fenced partition is released (its new owner prunes it); a database outage
        ends the round, and the next tick tries again.
        """
        total = 0
        for partition, claim in sorted(self.ownerships.held().items()):
            for _ in range(self.max_chunks_per_partition):
                try:
                    async with self.engine.begin() as conn:
                        await check_fenced(conn, claim)
                        deleted = await prune_expired(
                            conn,
                            partition=partition,
                            retention_s=self.retention_s,
                            limit=self.chunk_rows,
                        )
                except FencedError:
                    self.metrics.fenced_writes.inc()
                    self.ownerships.release([partition])
                    break
                except Exception as e:
                    if not is_back_pressure(e):
                        raise
                    logger.warning("pruning: database unavailable (%s); next tick retries", e)
                    return total
                self.metrics.records_pruned.inc(deleted)
                total += deleted
                if deleted < self.chunk_rows:
                    break
                await asyncio.sleep(0)  # let the apply agent in between chunks
        if total:
            logger.info("pruned %d event records older than %.0f s", total, self.retention_s)
        return total


async def topic_retention_ms(bootstrap: str, topic: str) -> int | None:
    """The topic's effective ``retention.ms`` (its own or the broker's default).

    Returns None when the topic keeps records forever (-1). Raises LookupError when
    the broker does not describe the topic.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"retention.ms": None})]
        )
    finally:
        await admin.close()
    for response in responses:
        for error_code, message, _type, name, entries in response.resources:
            if name != topic:
                continue
            if error_code:
                raise LookupError(f"cannot describe topic {topic}: error {error_code} {message}")
            for entry in entries:
                if entry[0] == "retention.ms":
                    value = int(entry[1])
                    return None if value < 0 else value
    raise LookupError(f"the broker did not report retention.ms of topic {topic}")


def retention_problem(record_retention_s: float, kafka_retention_ms: int | None) -> str | None:
    """Why the record window is unsafe for the topic's retention, or None if it is safe.

    A topic that keeps records forever cannot be out-waited by any window; it is not
    refused (records are only read again after a deliberate offset reset) but the
    caller should warn.
    """
    if kafka_retention_ms is None:
        return None
    if record_retention_s * 1000 <= kafka_retention_ms:
        return (
            f"event records are kept {record_retention_s:.0f} s, but the events topic keeps "
            f"records {kafka_retention_ms / 1000:.0f} s: a record read again after its "
            "deduplication key was pruned would apply twice. Raise "
            "FLEETPLANE_CONTROLLER_RECORD_RETENTION_S above the topic's retention.ms"
        )
    return None

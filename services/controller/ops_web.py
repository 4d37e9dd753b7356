"""The ops pieces a running controller serves: ``/status``, the lag gauge, the pruner.

Registered on the faust app by ``register_ops`` (called from ``app.create_app``);
the logic lives in ``ops.py`` and ``retention.py``, which know nothing of faust.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import faust
from aiokafka.errors import KafkaError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.controller.claims import Ownerships
from services.controller.metrics import ControllerMetrics
from services.controller.ops import (
    CustomerPartitions,
    StallTracker,
    StatusReader,
    count_environments,
    liveness_of_owned,
)
from services.controller.ownership import Claim
from services.controller.retention import RecordPruner
from services.controller.settings import ControllerSettings

logger = logging.getLogger(__name__)

LAG_INTERVAL_S = 1.0
"""How often the lag and stall gauges are refreshed: one ListOffsets request to Kafka."""


def update_lag(
    metrics: ControllerMetrics,
    held: Mapping[int, Claim],
    log_end: Callable[[int], int | None],
    exported: set[int],
    *,
    stalls: StallTracker | None = None,
    fetched: Mapping[int, tuple[int, float]] | None = None,
    now_s: float | None = None,
) -> set[int]:
    """Set the lag and oldest-pending-age gauges of every held partition; drop the others.

    ``log_end(p)`` is the partition's log end in Kafka (None when unknown: the
    partition is then left out); ``fetched`` the (offset, timestamp) of the first
    record of each batch being applied. Only the owner exports a partition, so
    summing over controllers never counts one twice. Returns the partitions now
    exported.
    """
    now = time.time() if now_s is None else now_s
    exporting: set[int] = set()
    for partition, claim in held.items():
        end = log_end(partition)
        if end is None:
            continue
        label = str(partition)
        metrics.partition_lag.labels(label).set(max(end - claim.next_offset, 0))
        if stalls is not None:
            age = stalls.observe(
                claim.topic,
                partition,
                claim.next_offset,
                end,
                now,
                (fetched or {}).get(partition),
            )
            metrics.oldest_pending_age.labels(label).set(age)
        exporting.add(partition)
    gone = exported - exporting
    for partition in gone:
        metrics.partition_lag.remove(str(partition))
        if stalls is not None:
            metrics.oldest_pending_age.remove(str(partition))
    if stalls is not None:
        stalls.forget(gone)
    return exporting


def register_ops(
    app: faust.App,
    settings: ControllerSettings,
    *,
    engine: AsyncEngine,
    ownerships: Ownerships,
    metrics: ControllerMetrics,
    pending: Callable[[], Mapping[int, tuple[int, float]]],
    log_ends: Callable[[list[int]], Awaitable[Mapping[int, int]]],
) -> None:
    """``pending()``: per partition, (offset, timestamp) of the first record being applied;
    ``log_ends(partitions)``: Kafka's log end of each (asked, not the last fetch's: a
    consumer held back by a stuck batch stops fetching, so its last fetch goes stale)."""
    kafka = settings.kafka
    customers = CustomerPartitions()
    reader = StatusReader(engine, kafka, customers)

    @app.page("/status")
    async def status(web: Any, request: Any) -> Any:
        customer = request.query.get("customer") or None
        try:
            report = await reader.read(customer)
        except Exception as e:
            logger.warning("status: %s", e, exc_info=True)
            return web.json({"error": f"{e.__class__.__name__}: {e}"}, status=503)
        body = report.to_json()
        # What this controller believes it holds; the table above is what the fence
        # enforces, so a difference shows a rebalance in flight or a zombie.
        body["instance"] = {
            "id": settings.instance_id,
            "group": settings.group_id,
            "held": {
                str(p): {"epoch": c.epoch, "next_offset": c.next_offset}
                for p, c in sorted(ownerships.held().items())
            },
            "refused": {str(p): why for p, why in ownerships.refused.items()},
        }
        return web.json(body)

    exported: set[int] = set()
    stalls = StallTracker(settings.stall_warning_s, settings.instance_id)

    @app.timer(interval=LAG_INTERVAL_S, name="partition-lag")  # type: ignore[untyped-decorator]  # faust leaves timer untyped
    async def refresh_lag() -> None:
        nonlocal exported
        held = ownerships.held()
        try:
            ends = await asyncio.wait_for(log_ends(sorted(held)), LAG_INTERVAL_S * 5)
        except (KafkaError, TimeoutError) as e:
            # Kafka unreachable: the gauges keep their last values until it answers.
            logger.info("lag: log ends unavailable (%r)", e)
            ends = None
        if ends is not None:
            exported = update_lag(
                metrics, held, ends.get, exported, stalls=stalls, fetched=pending()
            )
        publish_environments()

    # Environments by customer and liveness, for the customers this controller owns:
    # one exporter per customer across the group, so sums over controllers hold. The
    # database is read every liveness_export_interval_s; which customers are exported
    # follows ownership every second (with the lag), so after a rebalance a customer
    # is not counted by its old and new owner for longer than that.
    environment_counts: list[tuple[str, str, int]] = []
    exported_environments: set[tuple[str, str]] = set()

    @app.timer(interval=settings.liveness_export_interval_s, name="environments-by-liveness")  # type: ignore[untyped-decorator]  # faust leaves timer untyped
    async def count_environments_now() -> None:
        nonlocal environment_counts
        if not ownerships.held():
            return
        try:
            async with engine.connect() as conn:
                environment_counts = await count_environments(
                    conn,
                    connected_s=settings.liveness_connected_s,
                    lost_s=settings.liveness_lost_s,
                )
        except (SQLAlchemyError, OSError) as e:
            # The database is down: keep the last counts; the apply path and its
            # alerts say so. The next tick tries again.
            logger.warning("environments by liveness: %s", e)

    def publish_environments() -> None:
        nonlocal exported_environments
        gauges = liveness_of_owned(
            environment_counts, ownerships.held(), kafka.topic_partitions, customers
        )
        for (customer, liveness), n in gauges.items():
            metrics.environments.labels(customer, liveness).set(n)
        for customer, liveness in exported_environments - gauges.keys():
            metrics.environments.remove(customer, liveness)
        exported_environments = set(gauges)

    pruner = RecordPruner(
        engine,
        ownerships,
        metrics,
        retention_s=settings.record_retention_s,
        chunk_rows=settings.prune_chunk_rows,
    )

    @app.timer(interval=settings.prune_interval_s, name="prune-event-records")  # type: ignore[untyped-decorator]  # faust leaves timer untyped
    async def prune_event_records() -> None:
        await pruner.tick()

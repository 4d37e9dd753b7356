"""Consuming the events topic: an aiokafka consumer in the controllers' consumer group.

faust runs the controller (its app, web views, timers and producer); the events
are consumed here, on aiokafka's documented surface: ``subscribe`` with a
``ConsumerRebalanceListener``, ``getmany``, ``seek``, ``pause``, ``end_offsets``. A
consumed batch goes to the ``Applier`` whole, with every partition's records in
offset order. Where a partition starts is the offset stored in PostgreSQL with
the effects, never Kafka's committed offset (nothing is committed to Kafka).

The rebalance callbacks carry ownership:

- revoked: the partitions are released first, so a batch retrying against an
  unavailable database stops retrying them; then the callback waits for the batch
  in flight to end, so no batch of ours runs while another member takes over;
- assigned: a fresh epoch is claimed for each partition, and the consumer is
  positioned at its stored offset before it fetches anything. A partition whose
  stored offset Kafka has already deleted is refused and paused.

A controller stops by ending the loop, letting the batch in flight commit, and
leaving the group (``AIOKafkaConsumer.stop`` sends LeaveGroup), so the partitions
move at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from services.controller.applier import Applier, CallableSource, GuardedSeek, RecordSource
from services.controller.claims import Ownerships
from services.controller.handlers import Delivered
from services.controller.metrics import ControllerMetrics
from services.controller.settings import ControllerSettings

logger = logging.getLogger(__name__)


class PartitionConsumer:
    """Feeds the ``Applier`` from the events topic while this member owns partitions.

    ``start`` joins the group; ``run`` consumes until ``stop``. Not thread-safe:
    everything runs on the controller's event loop.
    """

    def __init__(
        self,
        settings: ControllerSettings,
        ownerships: Ownerships,
        metrics: ControllerMetrics,
        make_applier: Callable[[RecordSource], Applier],
    ) -> None:
        """``make_applier(source)`` builds the applier on this consumer's seeks and log starts."""
        kafka = settings.kafka
        self._topic = kafka.events_topic
        self._ownerships = ownerships
        self._metrics = metrics
        self._batch_max = settings.batch_max_records
        self._poll_ms = int(settings.batch_within_s * 1000)
        self._consumer_options = {
            "bootstrap_servers": kafka.kafka_bootstrap,
            "group_id": settings.group_id,
            "client_id": settings.instance_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "session_timeout_ms": int(settings.session_timeout_s * 1000),
            "heartbeat_interval_ms": int(settings.heartbeat_interval_s * 1000),
            "rebalance_timeout_ms": int(settings.rebalance_timeout_s * 1000),
            # A broker restart can answer the first rejoin with metadata that lacks
            # our topic; the group then assigns nothing until the metadata is
            # refreshed (aiokafka's default: every 5 minutes).
            "metadata_max_age_ms": 5000,
        }
        self._consumer: AIOKafkaConsumer | None = None
        """Made in ``start``: aiokafka binds it to the running event loop."""
        self.applier = make_applier(
            CallableSource(GuardedSeek(self._seek, self._assigned), self._log_start)
        )
        self._batch = asyncio.Lock()
        """Held while a batch is applied; the revoke callback waits for it."""
        self._stopping = asyncio.Event()
        self._failed: BaseException | None = None
        self.rebalancing = True
        """Between a revocation and the next assignment (and before the first one)."""

    # --- what the Applier and the ops views use --------------------------------------

    def _tp(self, partition: int) -> TopicPartition:
        return TopicPartition(self._topic, partition)

    @property
    def _kafka(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("the consumer is not started")
        return self._consumer

    def _assigned(self, partition: int) -> bool:
        return self._consumer is not None and self._tp(partition) in self._consumer.assignment()

    async def _seek(self, partition: int, offset: int) -> None:
        self._kafka.seek(self._tp(partition), offset)

    async def _log_start(self, partition: int) -> int:
        tp = self._tp(partition)
        return int((await self._kafka.beginning_offsets([tp]))[tp])

    async def log_ends(self, partitions: list[int]) -> dict[int, int]:
        """Kafka's log end of each of ``partitions`` (one ListOffsets request); {} before start."""
        if self._consumer is None or not partitions:
            return {}
        ends = await self._consumer.end_offsets([self._tp(p) for p in partitions])
        return {tp.partition: int(offset) for tp, offset in ends.items()}

    # --- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(**self._consumer_options)
        await self._consumer.start()
        self._consumer.subscribe([self._topic], listener=_Listener(self))

    async def run(self) -> None:
        """Consume and apply until ``stop``; every batch is applied before the next fetch."""
        while not self._stopping.is_set():
            if self._failed is not None:
                raise RuntimeError("taking over assigned partitions failed") from self._failed
            fetched = await self._next_batch()
            if not fetched:
                continue
            delivered = [
                Delivered(
                    partition=tp.partition,
                    offset=record.offset,
                    key=record.key,
                    value=record.value,
                    timestamp_s=_seconds(record.timestamp),
                )
                for tp, records in fetched.items()
                for record in records
            ]
            async with self._batch:
                if self._stopping.is_set():
                    return  # the stored offset tells the next owner where to start
                await self.applier.apply(delivered)

    async def _next_batch(self) -> dict[TopicPartition, list[Any]]:
        """Up to ``batch_max`` fetched records, every partition with records getting a share.

        aiokafka's ``getmany`` hands out one partition's fetched records before the
        next partition's, so one customer's backlog (a fetch of up to a megabyte)
        would hold every other partition of this controller back until it drains.
        Each partition first gets ``batch_max / partitions`` records, in partition
        order; what is left of the batch is then filled from any partition. Waits
        up to ``batch_within_s`` only when nothing is fetched at all.
        """
        consumer = self._kafka
        assigned = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
        share = max(self._batch_max // max(len(assigned), 1), 1)
        fetched: dict[TopicPartition, list[Any]] = {}
        for tp in assigned:
            got = await consumer.getmany(tp, timeout_ms=0, max_records=share)
            fetched.update(got)
        room = self._batch_max - sum(len(r) for r in fetched.values())
        if room > 0:
            more = await consumer.getmany(
                timeout_ms=0 if fetched else self._poll_ms, max_records=room
            )
            for tp, records in more.items():
                fetched.setdefault(tp, []).extend(records)
        return fetched

    async def stop(self, drain_timeout_s: float, leave_timeout_s: float = 5.0) -> None:
        """Apply no new batch, let the one in flight commit, then leave the group.

        A batch that outlasts ``drain_timeout_s`` is cut (its transaction rolls back
        and the next owner applies it). Leaving the group makes the coordinator
        rebalance at once instead of waiting for the session to time out.
        """
        self._stopping.set()
        if not await self.applier.drain(drain_timeout_s):
            logger.warning(
                "the batch being applied did not finish within %.0f s; it rolls back",
                drain_timeout_s,
            )
        if self._consumer is None:
            return
        try:
            await asyncio.wait_for(self._consumer.stop(), leave_timeout_s)
        except TimeoutError:
            # The group drops this member after its session timeout instead.
            logger.warning("leaving the consumer group took over %.0f s", leave_timeout_s)

    # --- rebalance callbacks -----------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        self.rebalancing = True
        mine = [tp.partition for tp in revoked if tp.topic == self._topic]
        # Released before waiting: a batch held back by an unavailable database
        # retries only while it owns its partitions, so this ends its wait.
        self._ownerships.release(mine)
        async with self._batch:
            logger.info("revoked %s %s", self._topic, sorted(mine))

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._metrics.rebalances.inc()
        mine = sorted(tp.partition for tp in assigned if tp.topic == self._topic)
        try:
            await self._take_over(mine)
        except Exception as e:
            # aiokafka would log this and fetch the partitions from wherever it
            # likes; without claims nothing would apply them. End the controller
            # instead (its supervisor restarts it), from the consuming loop.
            logger.exception("could not take over partitions %s", mine)
            self._failed = e
            return
        self.rebalancing = False
        logger.info("assigned %s %s", self._topic, mine)

    async def _take_over(self, mine: list[int]) -> None:
        async with self._batch:
            # Every assignment is a new generation: each partition gets a fresh epoch,
            # even one this member held before. A claim kept from an earlier
            # generation may have been superseded by another member in between (a
            # member that missed a revocation), and applying under it would be
            # fenced with nothing left to claim the partition again.
            self._ownerships.release(list(self._ownerships.held()))
            if mine:
                tps = [self._tp(p) for p in mine]
                log_start = await self._kafka.beginning_offsets(tps)
                claims = await self._ownerships.claim(
                    mine, {tp.partition: int(o) for tp, o in log_start.items()}
                )
                for partition in mine:
                    claim = claims.get(partition)
                    if claim is None:
                        # Refused (records deleted before they were applied): fetching
                        # it would only deliver records that cannot be applied.
                        self._kafka.pause(self._tp(partition))
                    else:
                        self._kafka.seek(self._tp(partition), claim.next_offset)


def _seconds(timestamp_ms: int | None) -> float | None:
    return None if timestamp_ms is None else timestamp_ms / 1000


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """aiokafka awaits these before the group moves on; see PartitionConsumer."""

    def __init__(self, consumer: PartitionConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._consumer.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._consumer.on_assigned(assigned)

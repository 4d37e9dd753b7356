"""The API's Kafka producer: the only module that builds aiokafka objects."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder

from services.api.service import KafkaHeaders
from services.api.settings import ApiSettings

# Kafka's default broker limit (message.max.bytes) is 1048588 bytes per record
# batch. A round's records go out as batches up to this size (a batch always
# takes its first record, whatever its size), so a full 1 MiB request body needs
# at most a few.
MAX_BATCH_BYTES: Final = 1_000_000


@dataclass(eq=False)
class _Part:
    """One request's records, waiting for or riding in a shared batch."""

    key: bytes
    values: Sequence[bytes]
    headers: KafkaHeaders
    done: asyncio.Future[None]


@dataclass(eq=False)
class _PartitionQueue:
    """The requests waiting for one partition, and the task sending them (None: idle)."""

    parts: list[_Part] = field(default_factory=list)
    sending: asyncio.Task[None] | None = None


class KafkaRecordProducer:
    """RecordProducer over a few AIOKafkaProducers: concurrent requests share batches.

    Per partition one round is on its way at a time: the requests that arrived
    while it was (group commit) go out together as the next round, as few
    batches as fit, through the next producer in turn. Under load a round
    carries many requests in one produce request, which is most of the API's
    and the broker's cost per request; alone, a request goes at once. Order per
    partition holds: a round is sent after the one before was acknowledged.

    A round Kafka refuses is sent again one request at a time, so a refusal
    (a record over the topic's size limit, say) fails only the requests whose
    own records Kafka refuses. A request that stops waiting (its deadline) is
    left out of any round not yet sent. The producers are not idempotent: an
    idempotent aiokafka producer retries a batch forever, so a batch answered
    503 could still reach the topic long after the agent's retry, whereas these
    fail a batch that is older than their request timeout (half the API's
    produce timeout) at its next error, or at once while its partition has no
    leader, instead of retrying it. What an internal retry or a resend may
    duplicate, the controller deduplicates by event id, as it does the agents'
    own retries.
    """

    def __init__(self, producers: Sequence[AIOKafkaProducer]) -> None:
        self._producers = list(producers)
        self._turn = itertools.cycle(self._producers)
        # The same choice as aiokafka's send() for a keyed record: murmur2 of the
        # key over the topic's partitions, so a customer's records share one.
        self._partitioner = DefaultPartitioner()
        self._queues: dict[tuple[str, int], _PartitionQueue] = {}

    async def send_batch(
        self, topic: str, *, key: bytes, values: Sequence[bytes], headers: KafkaHeaders
    ) -> list[asyncio.Future[Any]]:
        partitions = sorted(await self._producers[0].partitions_for(topic))
        partition = self._partitioner(key, partitions, partitions)
        part = _Part(key, values, headers, asyncio.get_running_loop().create_future())
        queue = self._queues.setdefault((topic, partition), _PartitionQueue())
        queue.parts.append(part)
        if queue.sending is None:
            queue.sending = asyncio.create_task(self._send_rounds(topic, partition, queue))
        return [part.done]

    async def _send_rounds(self, topic: str, partition: int, queue: _PartitionQueue) -> None:
        try:
            while queue.parts:
                waiting = [part for part in queue.parts if not part.done.done()]
                queue.parts = []
                if waiting:
                    await self._send_round(topic, partition, waiting)
        finally:
            queue.sending = None

    async def _send_round(self, topic: str, partition: int, parts: list[_Part]) -> None:
        """Send ``parts`` together; a refused one of several again on its own."""
        failed = await self._send_together(topic, partition, parts)
        if len(parts) == 1:
            for part, failure in failed.items():
                _settle(part, failure)
            return
        for part in failed:
            if not part.done.done():
                alone = await self._send_together(topic, partition, [part])
                _settle(part, alone.get(part))

    async def _send_together(
        self, topic: str, partition: int, parts: list[_Part]
    ) -> dict[_Part, BaseException]:
        """Send the parts in as few batches as fit, settling each part all of whose batches
        were acknowledged; returns the others with the failure of one of their batches."""
        producer = next(self._turn)
        futures: list[asyncio.Future[Any]] = []
        batches_of: dict[_Part, list[int]] = {}
        try:
            batch = producer.create_batch()
            for part in parts:
                for value in part.values:
                    added = batch.append(
                        key=part.key, value=value, timestamp=None, headers=part.headers
                    )
                    if added is None:
                        futures.append(await _submit(producer, batch, topic, partition))
                        batch = producer.create_batch()
                        # A fresh batch takes its first record whatever its size.
                        batch.append(
                            key=part.key, value=value, timestamp=None, headers=part.headers
                        )
                    # The batch being filled is the next future's.
                    indexes = batches_of.setdefault(part, [])
                    if not indexes or indexes[-1] != len(futures):
                        indexes.append(len(futures))
            futures.append(await _submit(producer, batch, topic, partition))
        except KafkaError as e:
            return dict.fromkeys(parts, e)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        failed: dict[_Part, BaseException] = {}
        for part in parts:
            failures = [
                o for i in batches_of.get(part, []) if isinstance(o := outcomes[i], BaseException)
            ]
            if failures:
                failed[part] = failures[0]
            else:
                _settle(part, None)
        return failed

    async def check(self, topic: str, timeout_s: float) -> None:
        # A fresh metadata request: the producer's cached metadata would say
        # nothing about whether a broker answers now.
        metadata = await asyncio.wait_for(self._producers[0].client.fetch_all_metadata(), timeout_s)
        if topic not in metadata.topics():
            raise KafkaError(f"topic {topic!r} does not exist")


def _settle(part: _Part, failure: BaseException | None) -> None:
    if part.done.done():  # its request stopped waiting
        return
    if failure is None:
        part.done.set_result(None)
    else:
        part.done.set_exception(failure)


async def _submit(
    producer: AIOKafkaProducer, batch: BatchBuilder, topic: str, partition: int
) -> asyncio.Future[Any]:
    # Closed, so that nothing else is added to it before it is sent.
    batch.close()
    future: asyncio.Future[Any] = await producer.send_batch(batch, topic, partition=partition)
    return future


def new_producer(settings: ApiSettings) -> AIOKafkaProducer:
    """An acks=all producer that gives a batch up after half of produce_timeout_s.

    Must be created inside the running event loop; the caller starts and stops it.
    """
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka.kafka_bootstrap.split(","),
        client_id="fleetplane-api",
        acks="all",
        # See KafkaRecordProducer: an idempotent producer never gives a batch up.
        enable_idempotence=False,
        # A round's batches are complete when queued (requests gather while the
        # round before is on its way); waiting adds nothing to them.
        linger_ms=0,
        max_batch_size=MAX_BATCH_BYTES,
        # Also each batch's time to live: a batch still unsent or unacknowledged
        # this long after it was queued fails instead of being retried.
        request_timeout_ms=int(settings.produce_timeout_s * 1000 / 2),
        retry_backoff_ms=100,
        # aiokafka's default is 5 minutes: that long after partitions are added, a
        # producer would still send a moving customer to its old partition.
        metadata_max_age_ms=int(settings.producer_metadata_max_age_s * 1000),
    )


@asynccontextmanager
async def kafka_producer(settings: ApiSettings) -> AsyncIterator[KafkaRecordProducer]:
    """Start the producers (raises KafkaError if no broker answers); flush and stop them on exit.

    Each producer's stop() flushes what it has queued.
    """
    async with AsyncExitStack() as stack:
        producers = []
        for _ in range(settings.producers):
            producer = new_producer(settings)
            # Stopped on exit whether or not it started (stop() after a failed start
            # releases its connections).
            stack.push_async_callback(producer.stop)
            await producer.start()
            producers.append(producer)
        yield KafkaRecordProducer(producers)

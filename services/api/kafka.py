"""The API's Kafka producer: the only module that builds aiokafka objects."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder

from services.api.service import KafkaHeaders
from services.api.settings import ApiSettings

# Kafka's default broker limit (message.max.bytes) is 1048588 bytes per record
# batch. A request's records go out as one batch up to this size (a batch always
# takes its first record, whatever its size), so a full 1 MiB request body needs
# at most a few.
MAX_BATCH_BYTES: Final = 1_000_000


class KafkaRecordProducer:
    """RecordProducer over a few AIOKafkaProducers: one batch of its own per request.

    Each request's records are queued as their own batch (``create_batch`` /
    ``send_batch``), so a batch that fails or that its request stopped waiting for
    touches no other request's records. The producers are not idempotent: an
    idempotent aiokafka producer retries a batch forever, so a batch answered 503
    could still reach the topic long after the agent's retry, whereas these fail
    a batch that is older than their request timeout (half the API's produce
    timeout) at its next error, or at once while its partition has no leader,
    instead of retrying it. What an internal retry may duplicate, the controller
    deduplicates by event id, as it does the agents' own retries.
    """

    def __init__(self, producers: Sequence[AIOKafkaProducer]) -> None:
        self._producers = list(producers)
        # Taken in turn. Requests that must stay in order are not concurrent: an
        # agent sends its next batch after the 202 of the one before, so that one
        # is on the topic already, whichever producer carries the next.
        self._turn = itertools.cycle(self._producers)
        # The same choice as aiokafka's send() for a keyed record: murmur2 of the
        # key over the topic's partitions, so a customer's records share one.
        self._partitioner = DefaultPartitioner()

    async def send_batch(
        self, topic: str, *, key: bytes, values: Sequence[bytes], headers: KafkaHeaders
    ) -> list[asyncio.Future[Any]]:
        producer = next(self._turn)
        partitions = sorted(await producer.partitions_for(topic))
        partition = self._partitioner(key, partitions, partitions)
        futures: list[asyncio.Future[Any]] = []
        batch = producer.create_batch()
        for value in values:
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                futures.append(await _submit(producer, batch, topic, partition))
                batch = producer.create_batch()
                # A fresh batch takes its first record whatever its size.
                batch.append(key=key, value=value, timestamp=None, headers=headers)
        futures.append(await _submit(producer, batch, topic, partition))
        return futures

    async def check(self, topic: str, timeout_s: float) -> None:
        # A fresh metadata request: the producer's cached metadata would say
        # nothing about whether a broker answers now.
        metadata = await asyncio.wait_for(self._producers[0].client.fetch_all_metadata(), timeout_s)
        if topic not in metadata.topics():
            raise KafkaError(f"topic {topic!r} does not exist")


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
        # Each request's batch is complete when queued; waiting adds nothing to it.
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

"""The API's Kafka producer: the only module that builds aiokafka objects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.api.service import KafkaHeaders
from services.api.settings import ApiSettings


class KafkaRecordProducer:
    """RecordProducer over an AIOKafkaProducer that it replaces after a failed batch.

    A batch answered 503 must not reach the topic later: the agent retries it, and
    a late copy would land after batches accepted since, breaking per-customer
    order. aiokafka keeps unacknowledged records queued and sends them when the
    broker returns, so after any failure this class drops the producer's queue
    and starts a new producer on next use.
    """

    def __init__(self, settings: ApiSettings, producer: AIOKafkaProducer) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = producer
        self._lock = asyncio.Lock()

    async def _current(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        async with self._lock:
            if self._producer is None:
                producer = new_producer(self._settings)
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def send(
        self, topic: str, *, key: bytes, value: bytes, headers: KafkaHeaders
    ) -> asyncio.Future[Any]:
        producer = await self._current()
        future: asyncio.Future[Any] = await producer.send(
            topic, value=value, key=key, headers=headers
        )
        return future

    async def abandon_pending(self) -> None:
        async with self._lock:
            producer, self._producer = self._producer, None
        if producer is None:
            return
        # aiokafka has no public call to drop queued records; with its sender task
        # cancelled first, stop() closes the connections without sending them.
        await producer._sender.close()
        await producer.stop()

    async def check(self, topic: str, timeout_s: float) -> None:
        producer = await asyncio.wait_for(self._current(), timeout_s)
        # A fresh metadata request: the producer's cached metadata would say
        # nothing about whether a broker answers now.
        metadata = await asyncio.wait_for(producer.client.fetch_all_metadata(), timeout_s)
        if topic not in metadata.topics():
            raise KafkaError(f"topic {topic!r} does not exist")

    async def stop(self) -> None:
        """Flush what is queued and stop."""
        async with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()


def new_producer(settings: ApiSettings) -> AIOKafkaProducer:
    """An idempotent, acks=all producer whose own timeouts fit inside produce_timeout_s.

    Must be created inside the running event loop; the caller starts and stops it.
    """
    timeout_ms = int(settings.produce_timeout_s * 1000)
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka.kafka_bootstrap.split(","),
        client_id="fleetplane-api",
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        request_timeout_ms=timeout_ms,
        retry_backoff_ms=100,
        # aiokafka's default is 5 minutes: that long after partitions are added, a
        # producer would still send a moving customer to its old partition.
        metadata_max_age_ms=int(settings.producer_metadata_max_age_s * 1000),
    )


@asynccontextmanager
async def kafka_producer(settings: ApiSettings) -> AsyncIterator[KafkaRecordProducer]:
    """Start a producer (raises KafkaError if no broker answers); flush and stop it on exit."""
    producer = new_producer(settings)
    try:
        await producer.start()
    except BaseException:
        await producer.stop()
        raise
    records = KafkaRecordProducer(settings, producer)
    try:
        yield records
    finally:
        await records.stop()

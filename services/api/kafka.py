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
    """RecordProducer over a started AIOKafkaProducer (which the caller owns)."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def send(
        self, topic: str, *, key: bytes, value: bytes, headers: KafkaHeaders
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = await self._producer.send(
            topic, value=value, key=key, headers=headers
        )
        return future

    async def check(self, topic: str, timeout_s: float) -> None:
        # A fresh metadata request: the producer's cached metadata would say
        # nothing about whether a broker answers now.
        metadata = await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout_s)
        if topic not in metadata.topics():
            raise KafkaError(f"topic {topic!r} does not exist")


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
    try:
        yield KafkaRecordProducer(producer)
    finally:
        await producer.stop()

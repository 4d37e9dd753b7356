"""Waiting for dependencies at start, with a clear message and a deadline."""

from __future__ import annotations

import asyncio
import logging

import psycopg
from aiokafka.admin import AIOKafkaAdminClient
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_fixed

logger = logging.getLogger(__name__)


class DependencyUnavailableError(RuntimeError):
    """A dependency did not answer within the start-up deadline."""


async def wait_for_postgres(dsn: str, timeout_s: float) -> None:
    """Return once PostgreSQL accepts a connection; raise DependencyUnavailableError."""

    async def probe() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=3) as conn:
            await conn.execute("SELECT 1")

    await _wait("PostgreSQL", probe, timeout_s)


async def wait_for_kafka(bootstrap: str, timeout_s: float, *, topics: tuple[str, ...] = ()) -> None:
    """Return once Kafka answers and every name in ``topics`` exists."""

    async def probe() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
        finally:
            await admin.close()
        missing = [t for t in topics if t not in existing]
        if missing:
            raise ConnectionError(f"topics not created yet: {', '.join(missing)}")

    await _wait(f"Kafka at {bootstrap}", probe, timeout_s)


async def _wait(name: str, probe: object, timeout_s: float) -> None:
    assert callable(probe)
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            stop=stop_after_delay(timeout_s),
            wait=wait_fixed(1.0),
            before_sleep=lambda state: logger.info(
                "waiting for %s: %s", name, state.outcome.exception() if state.outcome else "?"
            ),
            reraise=True,
        ):
            with attempt:
                await asyncio.wait_for(probe(), timeout=5)
    except Exception as e:
        raise DependencyUnavailableError(
            f"{name} did not become available within {timeout_s:.0f} s: {e}"
        ) from e
    logger.info("%s is available", name)

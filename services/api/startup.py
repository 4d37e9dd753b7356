"""Waiting for Kafka and PostgreSQL before the API starts serving."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError
from sqlalchemy import text

from services.api.settings import ApiSettings
from services.shared.db import create_engine

log = logging.getLogger(__name__)

ATTEMPT_TIMEOUT_S: Final = 3.0
RETRY_INTERVAL_S: Final = 1.0
LOG_INTERVAL_S: Final = 5.0


class DependencyTimeout(RuntimeError):
    """A dependency did not become usable within the startup timeout."""


async def kafka_ready(settings: ApiSettings) -> None:
    """Return when a broker answers and lists the events topic; raise otherwise."""
    client = AIOKafkaClient(
        bootstrap_servers=settings.kafka.kafka_bootstrap.split(","),
        client_id="fleetplane-api-startup",
        request_timeout_ms=int(ATTEMPT_TIMEOUT_S * 1000),
    )
    try:
        await client.bootstrap()
        metadata = await client.fetch_all_metadata()
    finally:
        await client.close()
    topic = settings.kafka.events_topic
    if topic not in metadata.topics():
        raise KafkaError(
            f"topic {topic!r} does not exist (create it: python -m services.shared.topics)"
        )


async def database_ready(settings: ApiSettings) -> None:
    """Return when PostgreSQL answers ``SELECT 1``; raise otherwise."""
    engine = create_engine(settings.database, application_name="fleetplane-api-startup")
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    finally:
        await engine.dispose()


async def wait_until(
    name: str, check: Callable[[], Awaitable[None]], *, deadline: float, where: str
) -> None:
    """Retry ``check`` until it succeeds; raise DependencyTimeout at ``deadline`` (monotonic)."""
    attempt = 0
    next_log = time.monotonic()
    while True:
        attempt += 1
        try:
            await asyncio.wait_for(check(), ATTEMPT_TIMEOUT_S)
        # Whatever the failure, the answer is the same: wait and try again.
        except Exception as e:
            reason = _reason(e)
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                raise DependencyTimeout(
                    f"{name} at {where} is not usable after {attempt} attempt(s) "
                    f"(FLEETPLANE_API_STARTUP_TIMEOUT_S); last error: {reason}"
                ) from e
            if now >= next_log:
                next_log = now + LOG_INTERVAL_S
                log.info(
                    "waiting for %s at %s (%s); giving up in %.0f s",
                    name,
                    where,
                    reason,
                    remaining,
                )
            await asyncio.sleep(min(RETRY_INTERVAL_S, remaining))
        else:
            log.info("%s at %s is ready", name, where)
            return


def _reason(error: BaseException) -> str:
    # SQLAlchemy wraps the driver's error in a message with SQL and a docs link.
    cause = getattr(error, "orig", None) or error
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


async def wait_for_dependencies(settings: ApiSettings) -> None:
    """Block until Kafka and PostgreSQL are usable, or raise DependencyTimeout.

    Both share one deadline of ``settings.startup_timeout_s``.
    """
    deadline = time.monotonic() + settings.startup_timeout_s
    # aiokafka logs every refused connection at ERROR; while waiting that is
    # expected, and our own line says it once per interval.
    kafka_log = logging.getLogger("aiokafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)
    try:
        await _wait_for_dependencies(settings, deadline)
    finally:
        kafka_log.setLevel(level)


async def _wait_for_dependencies(settings: ApiSettings, deadline: float) -> None:
    await wait_until(
        "Kafka",
        lambda: kafka_ready(settings),
        deadline=deadline,
        where=settings.kafka.kafka_bootstrap,
    )
    database = settings.database
    await wait_until(
        "PostgreSQL",
        lambda: database_ready(settings),
        deadline=deadline,
        where=f"{database.database_host}:{database.database_port}/{database.database_name}",
    )

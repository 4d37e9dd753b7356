"""Waiting for dependencies at start-up: one deadline, one clear message, every service.

Each service's entry point calls ``wait_for`` (or the two helpers below) before it
builds anything; a dependency still unusable at the deadline raises
DependencyUnavailableError naming it, where it was looked for, how many attempts
were made, the setting that sets the deadline, and the last error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

import psycopg
from aiokafka.admin import AIOKafkaAdminClient
from psycopg.conninfo import conninfo_to_dict
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_fixed

logger = logging.getLogger(__name__)

ATTEMPT_TIMEOUT_S: Final = 3.0
RETRY_INTERVAL_S: Final = 1.0
DEFAULT_SETTING: Final = "the service's FLEETPLANE_*_STARTUP_TIMEOUT_S"
"""Named in the message when the caller does not name its own setting."""
LOG_EVERY_ATTEMPTS: Final = 5
"""While waiting, one line per this many failed attempts (the first included)."""


class DependencyUnavailableError(RuntimeError):
    """A dependency did not answer within the start-up deadline."""


@dataclass(frozen=True, slots=True)
class Dependency:
    name: str
    """What it is ("PostgreSQL", "Kafka")."""
    where: str
    """Where it was looked for (host:port/database, the bootstrap list), without secrets."""
    probe: Callable[[], Awaitable[None]]
    """Returns when the dependency is usable; raises otherwise."""


def postgres(dsn: str) -> Dependency:
    """PostgreSQL at ``dsn`` (libpq form), usable when it answers ``SELECT 1``."""

    async def probe() -> None:
        timeout = int(ATTEMPT_TIMEOUT_S)
        async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=timeout) as conn:
            await conn.execute("SELECT 1")

    return Dependency("PostgreSQL", dsn_where(dsn), probe)


def kafka(bootstrap: str, topics: Sequence[str] = ()) -> Dependency:
    """Kafka at ``bootstrap``, usable when a broker answers and every one of ``topics`` exists."""

    async def probe() -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=int(ATTEMPT_TIMEOUT_S * 1000)
        )
        try:
            await admin.start()
            existing = set(await admin.list_topics())
        finally:
            await admin.close()
        missing = [t for t in topics if t not in existing]
        if missing:
            raise LookupError(
                f"topic(s) {', '.join(missing)} do not exist "
                "(create them: python -m services.shared.topics)"
            )

    return Dependency("Kafka", bootstrap, probe)


async def wait_for(dependencies: Sequence[Dependency], timeout_s: float, *, setting: str) -> None:
    """Return once every dependency is usable, in order, under one deadline of ``timeout_s``.

    Raises DependencyUnavailableError at the deadline; ``setting`` names the variable
    that sets ``timeout_s``, so the message says how to wait longer.
    """
    deadline = time.monotonic() + timeout_s
    with _quiet_kafka_client():
        for dependency in dependencies:
            await _wait(dependency, deadline, setting)


async def wait_for_postgres(dsn: str, timeout_s: float, *, setting: str = DEFAULT_SETTING) -> None:
    """Return once PostgreSQL accepts a connection; raise DependencyUnavailableError."""
    await wait_for([postgres(dsn)], timeout_s, setting=setting)


async def wait_for_kafka(
    bootstrap: str,
    timeout_s: float,
    *,
    topics: tuple[str, ...] = (),
    setting: str = DEFAULT_SETTING,
) -> None:
    """Return once Kafka answers and every name in ``topics`` exists."""
    await wait_for([kafka(bootstrap, topics)], timeout_s, setting=setting)


def dsn_where(dsn: str) -> str:
    """host:port/database of a libpq connection string, for messages (no credentials)."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the configured database"
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


async def _wait(dependency: Dependency, deadline: float, setting: str) -> None:
    def log_wait(state: RetryCallState) -> None:
        if (state.attempt_number - 1) % LOG_EVERY_ATTEMPTS == 0:
            error = state.outcome.exception() if state.outcome is not None else None
            logger.info(
                "waiting for %s at %s (%s); giving up in %.0f s",
                dependency.name,
                dependency.where,
                _reason(error),
                max(0.0, deadline - time.monotonic()),
            )

    attempts = 0
    try:
        async for attempt in AsyncRetrying(
            # Whatever the failure, the answer is the same: wait and try again.
            retry=retry_if_exception_type(Exception),
            stop=lambda _: time.monotonic() + RETRY_INTERVAL_S >= deadline,
            wait=wait_fixed(RETRY_INTERVAL_S),
            before_sleep=log_wait,
            reraise=True,
        ):
            with attempt:
                attempts += 1
                await asyncio.wait_for(dependency.probe(), ATTEMPT_TIMEOUT_S)
    except Exception as e:
        raise DependencyUnavailableError(
            f"{dependency.name} at {dependency.where} is not usable after {attempts} "
            f"attempt(s) ({setting}); last error: {_reason(e)}"
        ) from e
    logger.info("%s at %s is ready", dependency.name, dependency.where)


def _reason(error: BaseException | None) -> str:
    if error is None:
        return "?"
    # SQLAlchemy and psycopg wrap the cause in messages of several lines.
    cause = getattr(error, "orig", None) or error
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


@contextmanager
def _quiet_kafka_client() -> Iterator[None]:
    # aiokafka logs every refused connection at ERROR; while waiting that is
    # expected, and our own line says it once in a while.
    kafka_log = logging.getLogger("aiokafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        kafka_log.setLevel(level)

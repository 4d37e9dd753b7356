"""The process's one LISTEN connection on ``fleetplane_commands``, feeding CommandSignals.

One dedicated PostgreSQL connection per API process (autocommit, outside the
SQLAlchemy pool, which would hand it to other queries) listens for the
controller's notifications and wakes the waiting polls of the environment named
in each payload. When the connection fails it is re-opened with capped,
jittered exponential backoff (tenacity), and once LISTEN is active again every
waiter is woken to re-query, because notifications sent meanwhile are lost.
While it is down, polls still answer: they return at their deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol

import psycopg
from psycopg import sql
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from services.api.longpoll import COMMANDS_CHANNEL, CommandSignals
from services.api.settings import ApiSettings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S: Final = 5.0
HEALTH_INTERVAL_S: Final = 15.0
"""After this long, the listener checks its connection with a query: a peer that vanished
without closing TCP would otherwise leave it waiting for notifications forever."""
PING_TIMEOUT_S: Final = 5.0
BACKOFF_FIRST_S: Final = 0.2
BACKOFF_MAX_S: Final = 5.0


class NotifyConnection(Protocol):
    """The part of a database connection the listener uses (a fake in unit tests)."""

    async def listen(self, channel: str) -> None:
        """Start listening on ``channel``."""
        ...

    def notifications(self, timeout_s: float) -> AsyncIterator[tuple[str, str]]:
        """(channel, payload) of each notification as it arrives, for ``timeout_s`` seconds.

        Ends after ``timeout_s``; raises when the connection fails.
        """
        ...

    async def ping(self) -> None:
        """Return when the server answers a trivial query; raise otherwise."""
        ...

    async def close(self) -> None: ...


class PsycopgNotifyConnection:
    """NotifyConnection over a psycopg AsyncConnection in autocommit mode."""

    def __init__(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self._connection = connection

    @classmethod
    async def connect(cls, dsn: str) -> PsycopgNotifyConnection:
        """Open a connection (raises psycopg.OperationalError when the server is unreachable)."""
        connection = await psycopg.AsyncConnection.connect(
            dsn,
            autocommit=True,
            application_name="fleetplane-api-listen",
            connect_timeout=int(CONNECT_TIMEOUT_S),
        )
        return cls(connection)

    async def listen(self, channel: str) -> None:
        await self._connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    async def notifications(self, timeout_s: float) -> AsyncIterator[tuple[str, str]]:
        async for notify in self._connection.notifies(timeout=timeout_s):
            yield notify.channel, notify.payload

    async def ping(self) -> None:
        await self._connection.execute("SELECT 1")

    async def close(self) -> None:
        await self._connection.close()


Connect = Callable[[], Awaitable[NotifyConnection]]


class CommandListener:
    """Keeps one LISTEN connection alive and turns its notifications into wake-ups.

    ``run()`` works until cancelled; ``running()`` runs it as a background task.
    """

    def __init__(
        self,
        connect: Connect,
        signals: CommandSignals,
        *,
        health_interval_s: float = HEALTH_INTERVAL_S,
        ping_timeout_s: float = PING_TIMEOUT_S,
        backoff_first_s: float = BACKOFF_FIRST_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self._connect = connect
        self._signals = signals
        self._health_interval_s = health_interval_s
        self._ping_timeout_s = ping_timeout_s
        self._backoff_first_s = backoff_first_s
        self._backoff_max_s = backoff_max_s
        self.listening = asyncio.Event()
        """Set while LISTEN is active (for tests and diagnostics)."""
        self.connections = 0
        """How many times LISTEN was established."""

    @asynccontextmanager
    async def running(self) -> AsyncIterator[CommandListener]:
        """Run in a background task for the block's duration; the first connect is not awaited."""
        task = asyncio.create_task(self.run(), name="fleetplane-commands-listener")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """Listen, reconnecting after any failure, until cancelled."""
        while True:
            connection = await self._open()
            self.connections += 1
            self.listening.set()
            woken = self._signals.wake_all()
            log.info("listening on %s (woke %d waiting poll(s))", COMMANDS_CHANNEL, woken)
            try:
                await self._consume(connection)
            # Whatever broke the connection, the remedy is a new one; a bug here
            # must not leave the process without wake-ups for good.
            except Exception as e:
                log.warning("LISTEN connection failed (%s: %s); reconnecting", type(e).__name__, e)
            finally:
                self.listening.clear()
                await _close_quietly(connection)

    async def _open(self) -> NotifyConnection:
        retrying = AsyncRetrying(
            wait=wait_exponential_jitter(
                multiplier=self._backoff_first_s,
                max=self._backoff_max_s,
                jitter=self._backoff_first_s,
            ),
            # Any failure to connect is retried (cancellation is not an Exception).
            retry=retry_if_exception_type(Exception),
            before_sleep=_log_retry,
            reraise=True,
        )
        connection: NotifyConnection = await retrying(self._open_once)
        return connection

    async def _open_once(self) -> NotifyConnection:
        connection = await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT_S)
        try:
            await asyncio.wait_for(connection.listen(COMMANDS_CHANNEL), CONNECT_TIMEOUT_S)
        except BaseException:
            await _close_quietly(connection)
            raise
        return connection

    async def _consume(self, connection: NotifyConnection) -> None:
        while True:
            async for channel, payload in connection.notifications(self._health_interval_s):
                if channel == COMMANDS_CHANNEL:
                    self._signals.notify_payload(payload)
            await asyncio.wait_for(connection.ping(), self._ping_timeout_s)


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning(
        "cannot LISTEN on %s (attempt %d: %s); retrying in %.1f s",
        COMMANDS_CHANNEL,
        state.attempt_number,
        error,
        delay,
    )


async def _close_quietly(connection: NotifyConnection) -> None:
    try:
        await connection.close()
    # Closing a broken connection may fail too; it is being dropped either way.
    except Exception as e:
        log.debug("closing the LISTEN connection failed: %s", e)


@asynccontextmanager
async def command_listener(
    settings: ApiSettings, signals: CommandSignals
) -> AsyncIterator[CommandListener]:
    """The production listener on ``settings.database``, running for the block's duration.

    Does not wait for the first connection: the API starts even while PostgreSQL
    is unreachable, and polls answer at their deadline until it is back.
    """
    dsn = settings.database.libpq_dsn

    async def connect() -> NotifyConnection:
        return await PsycopgNotifyConnection.connect(dsn)

    async with CommandListener(connect, signals).running() as listener:
        yield listener

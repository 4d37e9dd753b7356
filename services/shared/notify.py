"""Keep an in-memory copy of some tables current: reload on NOTIFY, and on a timer.

``StateFollower`` holds one dedicated autocommit connection that LISTENs on a
channel. It calls ``reload(connection)`` once LISTEN is active (notifications
sent while it was not listening are lost, so a full reload follows every
(re)connect), after each burst of notifications, and every ``interval_s`` as a
safety net. Failures reconnect with capped, jittered exponential backoff
(tenacity); the last good state stays in use meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import psycopg
from psycopg import sql
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S: Final = 5
BACKOFF_FIRST_S: Final = 0.2
BACKOFF_MAX_S: Final = 5.0

Reload = Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]


class StateFollower:
    """Runs ``reload`` whenever ``channel`` is notified; see the module doc."""

    def __init__(
        self, dsn: str, channel: str, reload: Reload, *, interval_s: float, name: str
    ) -> None:
        self._dsn = dsn
        self._channel = channel
        self._reload = reload
        self._interval_s = interval_s
        self._name = name
        self.loaded = asyncio.Event()
        """Set after the first successful reload."""

    @asynccontextmanager
    async def running(self) -> AsyncIterator[StateFollower]:
        """Follow in a background task for the block's duration (the first load is not awaited)."""
        task = asyncio.create_task(self._run(), name=f"{self._name}-follower")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        # Reconnects the way the API's command listener does (tenacity, capped
        # jittered backoff); a failure after a good run starts the backoff afresh.
        while True:
            retrying = AsyncRetrying(
                wait=wait_exponential_jitter(
                    multiplier=BACKOFF_FIRST_S, max=BACKOFF_MAX_S, jitter=BACKOFF_FIRST_S
                ),
                # Any failure to connect or load is retried (cancellation is not an
                # Exception).
                retry=retry_if_exception_type(Exception),
                before_sleep=self._log_retry,
                reraise=True,
            )
            connection: psycopg.AsyncConnection[Any] = await retrying(self._connect_and_load)
            self.loaded.set()
            try:
                async with connection:
                    await self._follow(connection)
            # Whatever broke, the remedy is a new connection and a full reload.
            except Exception as e:
                log.warning(
                    "%s: following %s failed (%s: %s); reconnecting",
                    self._name,
                    self._channel,
                    type(e).__name__,
                    e,
                )

    async def _connect_and_load(self) -> psycopg.AsyncConnection[Any]:
        """A connection LISTENing on the channel, after a full reload through it."""
        connection = await psycopg.AsyncConnection.connect(
            self._dsn,
            autocommit=True,
            application_name=self._name,
            connect_timeout=CONNECT_TIMEOUT_S,
        )
        try:
            await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            await self._reload(connection)
        except BaseException:
            await connection.close()
            raise
        return connection

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "%s: following %s failed (%s: %s); retrying in %.1f s",
            self._name,
            self._channel,
            type(error).__name__,
            error,
            delay,
        )

    async def _follow(self, connection: psycopg.AsyncConnection[Any]) -> None:
        while True:
            notified = False
            async for _ in connection.notifies(timeout=self._interval_s, stop_after=1):
                notified = True
            if notified:
                # Drain a burst so many notifications cost one reload.
                async for _ in connection.notifies(timeout=0.01):
                    pass
            await self._reload(connection)

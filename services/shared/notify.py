"""Keep an in-memory copy of some tables current: reload on NOTIFY, and on a timer.

``StateFollower`` holds one dedicated autocommit connection that LISTENs on a
channel. It calls ``reload(connection)`` once LISTEN is active (notifications
sent while it was not listening are lost, so a full reload follows every
(re)connect), after each burst of notifications, and every ``interval_s`` as a
safety net. Failures reconnect with capped exponential backoff; the last good
state stays in use meanwhile.
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
        backoff = BACKOFF_FIRST_S
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._dsn,
                    autocommit=True,
                    application_name=self._name,
                    connect_timeout=CONNECT_TIMEOUT_S,
                ) as connection:
                    await connection.execute(
                        sql.SQL("LISTEN {}").format(sql.Identifier(self._channel))
                    )
                    await self._reload(connection)
                    self.loaded.set()
                    backoff = BACKOFF_FIRST_S
                    await self._follow(connection)
            # Whatever broke, the remedy is a new connection and a full reload.
            except Exception as e:
                log.warning(
                    "%s: following %s failed (%s: %s); retrying in %.1f s",
                    self._name,
                    self._channel,
                    type(e).__name__,
                    e,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

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

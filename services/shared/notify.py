"""Following PostgreSQL NOTIFY channels: one connection per process, every channel on it.

``NotifyFollower`` holds one dedicated autocommit connection (outside any
SQLAlchemy pool, which would hand it to other queries) that LISTENs on every
channel of its ``Channel`` list. Per channel:

- ``on_payload(payload)`` runs for each notification as it arrives;
- ``reload(connection)`` runs once LISTEN is active, after each burst of
  notifications on the channel (many cost one reload), and every
  ``reload_interval_s`` as a safety net;
- ``on_listen()`` runs each time LISTEN is (re)established.

Notifications sent while nobody listened are lost, which is why every
(re)connect runs every ``reload`` and ``on_listen``. A connection that fails,
or whose callbacks raise, is dropped and re-opened with capped, jittered
exponential backoff (tenacity); the last good state stays in use meanwhile. A
connection with nothing to do is pinged every ``health_interval_s``: a peer
that vanished without closing TCP would otherwise leave it waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

import psycopg
from psycopg import sql
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S: Final = 5.0
HEALTH_INTERVAL_S: Final = 15.0
PING_TIMEOUT_S: Final = 5.0
BACKOFF_FIRST_S: Final = 0.2
BACKOFF_MAX_S: Final = 5.0
BURST_S: Final = 0.01
"""After a notification on a reloading channel, how long more are gathered into one reload."""


class NotifyConnection(Protocol):
    """The part of a database connection the follower uses (a fake in unit tests)."""

    async def listen(self, channel: str) -> None:
        """Start listening on ``channel``."""
        ...

    def notifications(self, timeout_s: float) -> AsyncGenerator[tuple[str, str], None]:
        """(channel, payload) of each notification as it arrives, for ``timeout_s`` seconds.

        Ends after ``timeout_s``; raises when the connection fails.
        """
        ...

    async def ping(self) -> None:
        """Return when the server answers a trivial query; raise otherwise."""
        ...

    async def close(self) -> None: ...


Conn = TypeVar("Conn", bound=NotifyConnection)


class PsycopgNotifyConnection:
    """NotifyConnection over a psycopg AsyncConnection in autocommit mode."""

    def __init__(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self.connection = connection
        """For reloads that query through the LISTEN connection itself."""

    @classmethod
    async def connect(cls, dsn: str, application_name: str) -> PsycopgNotifyConnection:
        """Open a connection (raises psycopg.OperationalError when the server is unreachable)."""
        connection = await psycopg.AsyncConnection.connect(
            dsn,
            autocommit=True,
            application_name=application_name,
            connect_timeout=int(CONNECT_TIMEOUT_S),
        )
        return cls(connection)

    async def listen(self, channel: str) -> None:
        await self.connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    async def notifications(self, timeout_s: float) -> AsyncGenerator[tuple[str, str], None]:
        async for notify in self.connection.notifies(timeout=timeout_s):
            yield notify.channel, notify.payload

    async def ping(self) -> None:
        await self.connection.execute("SELECT 1")

    async def close(self) -> None:
        await self.connection.close()


@dataclass(frozen=True, slots=True)
class Channel(Generic[Conn]):
    """One followed channel and what its notifications do (see the module doc)."""

    name: str
    on_payload: Callable[[str], object] | None = None
    reload: Callable[[Conn], Awaitable[None]] | None = None
    reload_interval_s: float | None = None
    on_listen: Callable[[], object] | None = None


class NotifyFollower(Generic[Conn]):
    """Keeps one LISTEN connection alive for ``channels``; see the module doc.

    ``run()`` works until cancelled; ``running()`` runs it as a background task.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[Conn]],
        channels: Sequence[Channel[Conn]],
        *,
        name: str,
        health_interval_s: float = HEALTH_INTERVAL_S,
        ping_timeout_s: float = PING_TIMEOUT_S,
        backoff_first_s: float = BACKOFF_FIRST_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self._connect = connect
        self._channels = {channel.name: channel for channel in channels}
        self._name = name
        self._health_interval_s = health_interval_s
        self._ping_timeout_s = ping_timeout_s
        self._backoff_first_s = backoff_first_s
        self._backoff_max_s = backoff_max_s
        self.listening = asyncio.Event()
        """Set while LISTEN is active and the state was loaded through it."""
        self.loaded = asyncio.Event()
        """Set after the first successful connect and reload; stays set."""
        self.connections = 0
        """How many times LISTEN was established."""

    @asynccontextmanager
    async def running(self) -> AsyncIterator[NotifyFollower[Conn]]:
        """Run in a background task for the block's duration; the first connect is not awaited."""
        task = asyncio.create_task(self.run(), name=f"{self._name}-follower")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """Follow, reconnecting after any failure, until cancelled."""
        while True:
            retrying = AsyncRetrying(
                wait=wait_exponential_jitter(
                    multiplier=self._backoff_first_s,
                    max=self._backoff_max_s,
                    jitter=self._backoff_first_s,
                ),
                # Any failure to connect or load is retried (cancellation is not an
                # Exception).
                retry=retry_if_exception_type(Exception),
                before_sleep=self._log_retry,
                reraise=True,
            )
            connection: Conn = await retrying(self._open)
            self.connections += 1
            self.listening.set()
            self.loaded.set()
            for channel in self._channels.values():
                if channel.on_listen is not None:
                    channel.on_listen()
            log.info("%s: listening on %s", self._name, self._names)
            try:
                await self._follow(connection)
            # Whatever broke, the remedy is a new connection and a full reload; a bug
            # here must not leave the process without notifications for good.
            except Exception as e:
                log.warning(
                    "%s: following %s failed (%s: %s); reconnecting",
                    self._name,
                    self._names,
                    type(e).__name__,
                    e,
                )
            finally:
                self.listening.clear()
                await _close_quietly(connection)

    @property
    def _names(self) -> str:
        return ", ".join(self._channels)

    async def _open(self) -> Conn:
        """A connection LISTENing on every channel, after a full reload through it."""
        connection = await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT_S)
        try:
            for name in self._channels:
                await asyncio.wait_for(connection.listen(name), CONNECT_TIMEOUT_S)
            await self._reload(connection, list(self._channels))
        except BaseException:
            await _close_quietly(connection)
            raise
        return connection

    async def _reload(self, connection: Conn, names: Sequence[str]) -> None:
        for name in names:
            reload = self._channels[name].reload
            if reload is not None:
                await reload(connection)

    def _due(self, now: float) -> dict[str, float]:
        return {
            name: now + channel.reload_interval_s
            for name, channel in self._channels.items()
            if channel.reload is not None and channel.reload_interval_s is not None
        }

    async def _follow(self, connection: Conn) -> None:
        due = self._due(time.monotonic())
        checked = time.monotonic()
        while True:
            now = time.monotonic()
            until = min([checked + self._health_interval_s, *due.values()])
            dirty = await self._receive(connection, max(0.0, until - now))
            now = time.monotonic()
            dirty.update(name for name, at in due.items() if at <= now)
            if dirty:
                await self._reload(connection, sorted(dirty))
                due.update({name: at for name, at in self._due(now).items() if name in dirty})
                checked = now
            elif now >= checked + self._health_interval_s:
                await asyncio.wait_for(connection.ping(), self._ping_timeout_s)
                checked = now

    async def _receive(self, connection: Conn, timeout_s: float) -> set[str]:
        """Deliver notifications for up to ``timeout_s``; the reloading channels notified.

        Returns soon after the first notification on a reloading channel, once its
        burst is over.
        """
        dirty: set[str] = set()
        window = timeout_s
        while True:
            async with contextlib.aclosing(connection.notifications(window)) as notifies:
                async for name, payload in notifies:
                    channel = self._channels.get(name)
                    if channel is None:
                        continue
                    if channel.on_payload is not None:
                        channel.on_payload(payload)
                    if channel.reload is not None and name not in dirty:
                        dirty.add(name)
                        break
                else:
                    return dirty
            # A reloading channel was notified: gather the rest of its burst.
            window = BURST_S

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "%s: cannot follow %s (attempt %d: %s: %s); retrying in %.1f s",
            self._name,
            self._names,
            state.attempt_number,
            type(error).__name__,
            error,
            delay,
        )


async def _close_quietly(connection: NotifyConnection) -> None:
    try:
        await connection.close()
    # Closing a broken connection may fail too; it is being dropped either way.
    except Exception as e:
        log.debug("closing the LISTEN connection failed: %s", e)


def reloading(
    name: str,
    reload: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]],
    interval_s: float,
) -> Channel[PsycopgNotifyConnection]:
    """A channel whose notifications reload state through the LISTEN connection itself."""

    async def through(connection: PsycopgNotifyConnection) -> None:
        await reload(connection.connection)

    return Channel(name, reload=through, reload_interval_s=interval_s)


def psycopg_follower(
    dsn: str, channels: Sequence[Channel[PsycopgNotifyConnection]], *, name: str
) -> NotifyFollower[PsycopgNotifyConnection]:
    """The production follower: one psycopg connection to ``dsn`` named ``name``."""

    async def connect() -> PsycopgNotifyConnection:
        return await PsycopgNotifyConnection.connect(dsn, name)

    return NotifyFollower(connect, channels, name=name)

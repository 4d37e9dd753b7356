"""The one LISTEN connection, faked: notifications become wake-ups and reloads on one
connection; drops reconnect, wake all and reload."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import psycopg

from services.api.longpoll import CommandSignals
from services.shared.channels import COMMANDS_CHANNEL, IDENTITY_CHANNEL
from services.shared.notify import Channel, NotifyFollower
from tests.support.waiting import until

IDENTITY_RELOAD_S = 5.0


@dataclass
class FakeConnection:
    """Delivers what the test puts in ``inbox``; an exception put there breaks the connection."""

    inbox: asyncio.Queue[tuple[str, str] | BaseException] = field(default_factory=asyncio.Queue)
    channels: list[str] = field(default_factory=list)
    ping_error: BaseException | None = None
    pings: int = 0
    closed: bool = False

    async def listen(self, channel: str) -> None:
        self.channels.append(channel)

    async def notifications(self, timeout_s: float) -> AsyncGenerator[tuple[str, str], None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (remaining := deadline - loop.time()) > 0:
            try:
                item = await asyncio.wait_for(self.inbox.get(), remaining)
            except TimeoutError:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def ping(self) -> None:
        self.pings += 1
        if self.ping_error is not None:
            raise self.ping_error

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakeServer:
    """Hands out FakeConnections; ``refuse`` makes the next connects fail."""

    refuse: int = 0
    attempts: int = 0
    connections: list[FakeConnection] = field(default_factory=list)

    async def connect(self) -> FakeConnection:
        self.attempts += 1
        if self.refuse > 0:
            self.refuse -= 1
            raise psycopg.OperationalError("connection refused")
        connection = FakeConnection()
        self.connections.append(connection)
        return connection


@dataclass
class Reloads:
    """Counts the identity channel's reloads and on which connection each ran."""

    connections: list[FakeConnection] = field(default_factory=list)

    async def reload(self, connection: FakeConnection) -> None:
        self.connections.append(connection)


def listener(
    server: FakeServer,
    signals: CommandSignals,
    health_interval_s: float = 5.0,
    reloads: Reloads | None = None,
    reload_interval_s: float = IDENTITY_RELOAD_S,
) -> NotifyFollower[FakeConnection]:
    reloads = reloads or Reloads()
    return NotifyFollower(
        server.connect,
        [
            Channel(
                COMMANDS_CHANNEL, on_payload=signals.notify_payload, on_listen=signals.wake_all
            ),
            Channel(IDENTITY_CHANNEL, reload=reloads.reload, reload_interval_s=reload_interval_s),
        ],
        name="test",
        health_interval_s=health_interval_s,
        ping_timeout_s=0.2,
        backoff_first_s=0.01,
        backoff_max_s=0.05,
    )


async def test_notifications_wake_the_named_environment() -> None:
    server = FakeServer()
    signals = CommandSignals()
    async with listener(server, signals).running() as running:
        await asyncio.wait_for(running.listening.wait(), 1)
        connection = server.connections[0]
        assert connection.channels == [COMMANDS_CHANNEL, IDENTITY_CHANNEL]
        with signals.subscribe("acme", "prod") as prod, signals.subscribe("acme", "dev") as dev:
            connection.inbox.put_nowait((COMMANDS_CHANNEL, "acme/prod"))
            await until(lambda: prod.signalled)
            connection.inbox.put_nowait(("other_channel", "acme/dev"))
            connection.inbox.put_nowait((COMMANDS_CHANNEL, "not a payload"))
            await asyncio.sleep(0.05)
            assert not dev.signalled
    assert connection.closed


async def test_a_dropped_connection_reconnects_and_wakes_everyone() -> None:
    server = FakeServer()
    signals = CommandSignals()
    async with listener(server, signals).running() as running:
        await asyncio.wait_for(running.listening.wait(), 1)
        with signals.subscribe("acme", "prod") as prod, signals.subscribe("other", "x") as other:
            server.refuse = 2  # the database is briefly unreachable
            server.connections[0].inbox.put_nowait(psycopg.OperationalError("server closed"))
            await until(lambda: running.connections == 2)
            # Notifications sent while nobody listened are lost: every poll re-queries.
            assert prod.signalled
            assert other.signalled
        assert server.attempts == 4
        assert server.connections[0].closed
        assert running.listening.is_set()


async def test_a_silent_dead_connection_is_detected_by_ping() -> None:
    server = FakeServer()
    signals = CommandSignals()
    async with listener(server, signals, health_interval_s=0.05).running() as running:
        await asyncio.wait_for(running.listening.wait(), 1)
        await until(lambda: server.connections[0].pings >= 2)
        assert running.connections == 1
        server.connections[0].ping_error = OSError("no route to host")
        await until(lambda: running.connections == 2)
        assert server.connections[0].closed


async def test_the_listener_starts_while_the_database_is_down() -> None:
    server = FakeServer(refuse=1_000_000)
    signals = CommandSignals()
    async with listener(server, signals).running() as running:
        await until(lambda: server.attempts >= 3)
        assert not running.listening.is_set()
        server.refuse = 0
        await asyncio.wait_for(running.listening.wait(), 1)


async def test_both_channels_share_one_connection_and_identity_reloads_once_per_burst() -> None:
    server = FakeServer()
    signals = CommandSignals()
    reloads = Reloads()
    async with listener(server, signals, reloads=reloads).running() as running:
        await asyncio.wait_for(running.listening.wait(), 1)
        connection = server.connections[0]
        # Loaded through the LISTEN connection before anything is followed.
        assert reloads.connections == [connection]
        for _ in range(5):
            connection.inbox.put_nowait((IDENTITY_CHANNEL, "revocation:1"))
        with signals.subscribe("acme", "prod") as prod:
            connection.inbox.put_nowait((COMMANDS_CHANNEL, "acme/prod"))
            await until(lambda: prod.signalled)
        await until(lambda: len(reloads.connections) == 2)
        # Commands keep flowing after the reload, and cost none.
        with signals.subscribe("acme", "dev") as dev:
            connection.inbox.put_nowait((COMMANDS_CHANNEL, "acme/dev"))
            await until(lambda: dev.signalled)
        # The burst of five cost one reload.
        assert reloads.connections == [connection, connection]
        assert len(server.connections) == 1


async def test_identity_reloads_on_its_interval_and_after_every_reconnect() -> None:
    server = FakeServer()
    signals = CommandSignals()
    reloads = Reloads()
    async with listener(
        server, signals, reloads=reloads, reload_interval_s=0.05
    ).running() as running:
        await until(lambda: len(reloads.connections) >= 3)
        server.connections[0].inbox.put_nowait(psycopg.OperationalError("server closed"))
        await until(lambda: running.connections == 2)
        assert reloads.connections[-1] is server.connections[1]


async def test_a_failing_reload_reconnects_and_keeps_following() -> None:
    server = FakeServer()
    failures = [psycopg.OperationalError("canceling statement")]

    async def reload(connection: FakeConnection) -> None:
        if len(server.connections) == 1 and failures:
            raise failures.pop()

    follower = NotifyFollower(
        server.connect,
        [Channel(IDENTITY_CHANNEL, reload=reload, reload_interval_s=5.0)],
        name="test",
        backoff_first_s=0.01,
        backoff_max_s=0.05,
    )
    async with follower.running() as running:
        await asyncio.wait_for(running.loaded.wait(), 1)
        # The first connection's load failed: it was closed and a second one loaded.
        assert server.connections[0].closed
        assert running.connections == 1
        assert len(server.connections) == 2

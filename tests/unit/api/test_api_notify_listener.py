"""The LISTEN connection, faked: notifications become wake-ups; drops reconnect and wake all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import psycopg

from services.api.longpoll import COMMANDS_CHANNEL, CommandSignals
from services.api.notify_listener import CommandListener, NotifyConnection

from .conftest import eventually


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

    async def notifications(self, timeout_s: float) -> AsyncIterator[tuple[str, str]]:
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

    async def connect(self) -> NotifyConnection:
        self.attempts += 1
        if self.refuse > 0:
            self.refuse -= 1
            raise psycopg.OperationalError("connection refused")
        connection = FakeConnection()
        self.connections.append(connection)
        return connection


def listener(
    server: FakeServer, signals: CommandSignals, health_interval_s: float = 5.0
) -> CommandListener:
    return CommandListener(
        server.connect,
        signals,
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
        assert connection.channels == [COMMANDS_CHANNEL]
        with signals.subscribe("acme", "prod") as prod, signals.subscribe("acme", "dev") as dev:
            connection.inbox.put_nowait((COMMANDS_CHANNEL, "acme/prod"))
            await eventually(lambda: prod.signalled)
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
            await eventually(lambda: running.connections == 2)
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
        await eventually(lambda: server.connections[0].pings >= 2)
        assert running.connections == 1
        server.connections[0].ping_error = OSError("no route to host")
        await eventually(lambda: running.connections == 2)
        assert server.connections[0].closed


async def test_the_listener_starts_while_the_database_is_down() -> None:
    server = FakeServer(refuse=1_000_000)
    signals = CommandSignals()
    async with listener(server, signals).running() as running:
        await eventually(lambda: server.attempts >= 3)
        assert not running.listening.is_set()
        server.refuse = 0
        await asyncio.wait_for(running.listening.wait(), 1)

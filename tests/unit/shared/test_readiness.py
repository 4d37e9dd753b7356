"""Start-up waits: one deadline for every dependency and a message that says what to do."""

from __future__ import annotations

import socket
import time

import pytest

from services.shared import readiness
from services.shared.readiness import Dependency, DependencyUnavailableError, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_a_dependency_that_comes_up_is_waited_for() -> None:
    attempts = 0

    async def probe() -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 2:
            raise ConnectionRefusedError("connection refused")

    await wait_for([Dependency("PostgreSQL", "db:5432/x", probe)], 10, setting="X_TIMEOUT_S")
    assert attempts == 2


async def test_at_the_deadline_the_message_names_what_where_how_often_and_the_setting() -> None:
    async def refused() -> None:
        raise ConnectionRefusedError("connection refused\nsecond line of detail")

    started = time.monotonic()
    with pytest.raises(DependencyUnavailableError) as caught:
        await wait_for(
            [Dependency("Kafka", "127.0.0.1:1", refused)], 0.5, setting="FLEETPLANE_X_TIMEOUT_S"
        )
    assert time.monotonic() - started < 2
    assert str(caught.value) == (
        "Kafka at 127.0.0.1:1 is not usable after 1 attempt(s) (FLEETPLANE_X_TIMEOUT_S); "
        "last error: connection refused"
    )


async def test_dependencies_share_one_deadline() -> None:
    calls: list[str] = []

    async def slow_then_ready() -> None:
        calls.append("first")
        if len(calls) < 3:
            raise ConnectionRefusedError("not yet")

    async def never() -> None:
        calls.append("second")
        raise ConnectionRefusedError("never")

    started = time.monotonic()
    with pytest.raises(DependencyUnavailableError, match=r"^Second at b is not usable"):
        await wait_for(
            [Dependency("First", "a", slow_then_ready), Dependency("Second", "b", never)],
            2.5,
            setting="S",
        )
    # The first took two retries of the 2.5 s; the second got what was left, not 2.5 s more.
    assert time.monotonic() - started < 3.5
    assert calls.count("first") == 3


async def test_postgres_probe_refused_by_a_closed_port() -> None:
    port = free_port()
    dependency = readiness.postgres(f"host=127.0.0.1 port={port} dbname=x user=x")
    expected = rf"^PostgreSQL at 127\.0\.0\.1:{port}/x is not usable .*last error: "
    with pytest.raises(DependencyUnavailableError, match=expected):
        await wait_for([dependency], 0.5, setting="S")


def test_a_dsn_is_named_without_its_password() -> None:
    where = readiness.dsn_where("host=db port=6543 dbname=fleet user=u password=hunter2")
    assert where == "db:6543/fleet"

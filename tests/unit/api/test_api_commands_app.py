"""``GET /v1/commands`` through the app: scoped to the caller, woken by its environment only."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy.exc import OperationalError

from services.api.keys import SIGNALS
from services.api.longpoll import NEXT_POLL_S
from services.api.settings import ApiSettings
from tests.support.waiting import until

from .conftest import (
    AGENT,
    Client,
    FakeProducer,
    FakeRepository,
    Pki,
    problem,
    serve,
)
from .test_api_longpoll import command


async def test_returns_the_callers_commands_at_once(
    edge: Client, repository: FakeRepository
) -> None:
    repository.commands[("acme", "prod")] = [command(1), command(2, "delete")]
    repository.commands[("acme", "staging")] = [command(3)]
    started = time.monotonic()
    # Identity-looking query parameters are ignored: only the certificate counts.
    response = await edge.get("/v1/commands?wait=20&environment_id=staging", headers=AGENT)
    assert time.monotonic() - started < 0.5
    assert response.status == 200, await response.text()
    assert await response.json() == {
        "commands": [
            {
                "id": 1,
                "epoch": 3,
                "revision": 2,
                "action": "create",
                "resource": {"kind": "app", "name": "web", "version": "1.0"},
                "attempt": 1,
            },
            {
                "id": 2,
                "epoch": 3,
                "revision": 2,
                "action": "delete",
                "resource": {"kind": "app", "name": "web", "version": None},
                "attempt": 1,
            },
        ],
        "next_poll_s": 0,
    }
    assert repository.command_queries == [("acme", "prod")]


async def test_waiting_poll_is_woken_by_its_environment_not_another(
    edge: Client, repository: FakeRepository
) -> None:
    assert edge.app is not None
    signals = edge.app[SIGNALS]
    poll = asyncio.create_task(edge.get("/v1/commands?wait=10", headers=AGENT))
    await until(lambda: signals.waiting == 1)
    repository.commands[("acme", "staging")] = [command(5)]
    assert signals.notify_payload("acme/staging") == 0
    repository.commands[("other", "prod")] = [command(6)]
    assert signals.notify_payload("other/prod") == 0
    await asyncio.sleep(0.1)
    assert not poll.done()

    repository.commands[("acme", "prod")] = [command(7)]
    started = time.monotonic()
    assert signals.notify_payload("acme/prod") == 1
    response = await asyncio.wait_for(poll, 2)
    assert time.monotonic() - started < 0.5
    assert [c["id"] for c in (await response.json())["commands"]] == [7]
    assert repository.command_queries == [("acme", "prod")] * 2


async def test_empty_at_the_deadline(edge: Client, repository: FakeRepository) -> None:
    started = time.monotonic()
    response = await edge.get("/v1/commands?wait=1", headers=AGENT)
    assert 0.95 <= time.monotonic() - started < 1.5
    body = await response.json()
    assert body["commands"] == []
    assert NEXT_POLL_S[0] <= body["next_poll_s"] <= NEXT_POLL_S[1]
    assert len(repository.command_queries) == 1


async def test_wait_zero_does_not_hold(edge: Client, repository: FakeRepository) -> None:
    started = time.monotonic()
    response = await edge.get("/v1/commands?wait=0", headers=AGENT)
    assert time.monotonic() - started < 0.5
    assert (await response.json())["commands"] == []


async def test_invalid_wait_is_422(edge: Client, repository: FakeRepository) -> None:
    for bad in ("26", "-1", "1.5", "soon", "1&wait=2"):
        response = await edge.get(f"/v1/commands?wait={bad}", headers=AGENT)
        body = await problem(response, 422)
        assert body["errors"][0]["field"] == "wait"
    assert repository.command_queries == []


async def test_database_down_is_503(edge: Client, repository: FakeRepository) -> None:
    repository.error = OperationalError("SELECT", {}, Exception("connection refused"))
    response = await edge.get("/v1/commands?wait=5", headers=AGENT)
    await problem(response, 503)
    assert response.headers["Retry-After"] == "7"


async def test_unauthenticated_polls_are_refused(edge: Client, repository: FakeRepository) -> None:
    await problem(await edge.get("/v1/commands"), 403)  # from the edge, but no listener
    verify_failed = {**AGENT, "X-Fleetplane-Client-Verify": "NONE"}
    await problem(await edge.get("/v1/commands", headers=verify_failed), 401)
    assert repository.command_queries == []


async def test_shutdown_answers_waiting_polls_instead_of_cutting_them_off(
    settings: ApiSettings, pki: Pki, producer: FakeProducer, repository: FakeRepository
) -> None:
    async with serve(settings, producer, repository, pki.client_context("edge-client")) as client:
        assert client.app is not None
        signals = client.app[SIGNALS]
        poll = asyncio.create_task(client.get("/v1/commands?wait=20", headers=AGENT))
        await until(lambda: signals.waiting == 1)
        started = time.monotonic()
        await client.server.close()
        response = await asyncio.wait_for(poll, 5)
        assert time.monotonic() - started < 2
        assert response.status == 200
        assert (await response.json())["commands"] == []

"""Bounded in-flight work per process: the shared middleware and the API's lanes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.api.admission import AdmissionSettings, admission
from services.shared.admission import OVERLOADED_TYPE, Lane
from tests.support.waiting import until

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def gate() -> asyncio.Event:
    return asyncio.Event()


class Entered:
    """Counts the requests that reached a held handler; lets a test wait for a count."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Condition()

    async def arrive(self) -> None:
        async with self._changed:
            self.count += 1
            self._changed.notify_all()

    async def reach(self, count: int) -> None:
        async with asyncio.timeout(5), self._changed:
            await self._changed.wait_for(lambda: self.count >= count)


@pytest.fixture
def entered() -> Entered:
    return Entered()


@pytest.fixture
async def client(gate: asyncio.Event, entered: Entered) -> AsyncIterator[Client]:
    """The API's lanes with limits 2 (events), 3 (poll), 1 (other), no waiting for a slot;
    handlers wait on ``gate``."""

    async def held(request: web.Request) -> web.Response:
        await entered.arrive()
        await gate.wait()
        return web.json_response({"ok": True}, status=202 if request.method == "POST" else 200)

    async def probe(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    control = admission(AdmissionSettings(events=2, poll=3, other=1, retry_after_s=2, queue_s=0))
    app = web.Application(middlewares=[control.middleware])
    app.router.add_post("/v1/events", held)
    app.router.add_get("/v1/events/{event_id}", held)
    app.router.add_get("/v1/commands", held)
    app.router.add_get("/healthz", probe)
    app.router.add_get("/metrics", probe)
    client: Client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def _in_flight(
    client: Client, entered: Entered, method: str, path: str, count: int
) -> list[asyncio.Task[int]]:
    """``count`` requests, returned once every one of them is held in its handler."""

    async def call() -> int:
        async with client.request(method, path) as reply:
            await reply.read()
            return reply.status

    before = entered.count
    tasks = [asyncio.create_task(call()) for _ in range(count)]
    await entered.reach(before + count)
    assert not any(task.done() for task in tasks)
    return tasks


async def test_over_the_lane_limit_is_503_with_retry_after_and_a_problem(
    client: Client, gate: asyncio.Event, entered: Entered
) -> None:
    held = await _in_flight(client, entered, "POST", "/v1/events", 2)
    async with client.post("/v1/events") as reply:
        assert reply.status == 503
        assert reply.headers["Retry-After"] == "2"
        assert reply.content_type == "application/problem+json"
        body = json.loads(await reply.read())
    assert body["type"] == OVERLOADED_TYPE
    assert body["status"] == 503
    assert "events" in body["detail"]
    gate.set()
    assert [await task for task in held] == [202, 202]
    # Freed: admitted again.
    async with client.post("/v1/events") as reply:
        assert reply.status == 202


async def test_lanes_are_apart_and_probes_are_never_refused(
    client: Client, gate: asyncio.Event, entered: Entered
) -> None:
    polls = await _in_flight(client, entered, "GET", "/v1/commands?wait=20", 3)
    # Polls at their limit take no event accept's place, nor another route's.
    events = await _in_flight(client, entered, "POST", "/v1/events", 2)
    other = await _in_flight(client, entered, "GET", "/v1/events/ev-1", 1)
    async with client.get("/v1/commands") as reply:
        assert reply.status == 503
    async with client.get("/v1/events/ev-2") as reply:
        assert reply.status == 503
    for path in ("/healthz", "/metrics"):
        async with client.get(path) as reply:
            assert reply.status == 200, path
    gate.set()
    assert [await t for t in polls + other] == [200] * 4
    assert [await t for t in events] == [202] * 2


def test_a_lane_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        admission(AdmissionSettings.model_construct(events=0, poll=1, other=1, retry_after_s=1))


async def test_a_request_waits_for_a_slot_in_arrival_order_up_to_queue_s() -> None:
    """A burst over the limit is absorbed as latency; a wait past ``queue_s`` is shed."""
    gate = asyncio.Event()
    order: list[int] = []

    async def held(request: web.Request) -> web.Response:
        order.append(int(request.query["n"]))
        await gate.wait()
        return web.json_response({}, status=202)

    control = admission(AdmissionSettings(events=1, poll=1, other=1, queue_s=0.5, max_waiting=2))
    app = web.Application(middlewares=[control.middleware])
    app.router.add_post("/v1/events", held)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:

        async def post(n: int) -> int:
            async with client.post(f"/v1/events?n={n}") as reply:
                await reply.read()
                return reply.status

        lane = control.lanes["events"]
        first = asyncio.create_task(post(1))
        await until(lambda: order == [1], what="the first request running")
        waiting = [asyncio.create_task(post(n)) for n in (2, 3)]
        await until(lambda: len(lane.waiters) == 2, what="two requests waiting")
        # More than max_waiting: refused at once.
        assert await post(4) == 503
        # Slots pass on in arrival order as they free.
        gate.set()
        assert [await first, *[await task for task in waiting]] == [202, 202, 202]
        assert order == [1, 2, 3]
        assert (lane.in_flight, len(lane.waiters)) == (0, 0)

        # Nothing frees within queue_s: the waiter is shed, and leaves no trace.
        gate.clear()
        held_task = asyncio.create_task(post(5))
        await until(lambda: order[-1] == 5, what="a request holding the slot")
        assert await post(6) == 503
        assert (lane.in_flight, len(lane.waiters)) == (1, 0)
        gate.set()
        assert await held_task == 202
        assert lane.in_flight == 0


async def test_a_waiter_whose_wait_ended_as_a_slot_freed_leaves_the_counts_right() -> None:
    """The wait's end cancels the waiter's future before the waiter runs again; a slot
    freed in between skips it (and takes it off the queue) and goes to the next one."""
    lane = Lane("events", 1, queue_s=5, max_waiting=4)
    assert await lane.enter()
    first = asyncio.create_task(lane.enter())
    second = asyncio.create_task(lane.enter())
    await until(lambda: len(lane.waiters) == 2, what="two waiters")
    first.cancel()  # as its timeout would, first cancelling the future it awaits
    lane.leave()  # a request finishes before the first waiter runs again
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second
    assert (lane.in_flight, len(lane.waiters)) == (1, 0)
    lane.leave()
    assert lane.in_flight == 0

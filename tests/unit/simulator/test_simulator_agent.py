"""One agent's loops against a fake edge: boot batch, commands, results, samples."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest

from bench.simulator.agent import SimAgent, pause_after_poll
from bench.simulator.config import SimConfig
from bench.simulator.retry import RetryPolicy
from bench.simulator.stats import Stats
from bench.simulator.transport import Reply
from services.shared.commands import CommandsReply
from services.shared.events import EventBatch
from services.shared.identity import AgentIdentity
from tests.support.waiting import until

from .fakes import RecordingSleep, ScriptedTransport, accepted, command

IDENTITY = AgentIdentity("cust-0", "env-0", "agent-0")


class ZeroRandom(random.Random):
    """random() is always 0: every event is sampled, delays are their minimum, no failures."""

    def random(self) -> float:
        return 0.0


def test_pause_after_poll() -> None:
    empty = CommandsReply(commands=[], next_poll_s=1.2)
    busy = CommandsReply(commands=[command(1, 1)], next_poll_s=0)
    # Something new to apply: poll again at once.
    assert pause_after_poll(busy, elapsed_s=0.1, wait_s=20, new_commands=1) == 0.0
    # Only re-offers (results not yet recorded): do not spin on them.
    assert pause_after_poll(busy, elapsed_s=0.1, wait_s=20, new_commands=0) == 0.5
    # Empty after a held poll: the server's jittered pause, spreading agents out.
    assert pause_after_poll(empty, elapsed_s=19.5, wait_s=20, new_commands=0) == 1.2
    assert pause_after_poll(CommandsReply(commands=[], next_poll_s=0), 19.5, 20, 0) == 0.0
    # An early empty reply: the server's pause, with a floor against busy loops.
    assert pause_after_poll(empty, elapsed_s=0.2, wait_s=20, new_commands=0) == 1.2
    assert pause_after_poll(empty, elapsed_s=0.0, wait_s=0, new_commands=0) == 1.2
    assert pause_after_poll(CommandsReply(commands=[], next_poll_s=0), 0.0, 20, 0) == 0.5
    assert pause_after_poll(CommandsReply(commands=[], next_poll_s=0), 0.0, 0, 0) == 0.5


def test_offer_counts_each_decision() -> None:
    stats = Stats(0.0)
    agent = SimAgent(IDENTITY, SimConfig(), ScriptedTransport(), stats, random.Random(1))
    assert agent.offer([command(1, 5), command(2, 4), command(1, 5), command(3, 6)]) == 2
    assert stats.commands == {
        "delivered": 4,
        "stale_epoch_ignored": 1,
        "duplicate_ignored": 1,
    }
    assert stats.newest_epoch == 6
    assert agent.state.newest_epoch == 6


class FakeEdge:
    """Accepts every batch, offers one reply of commands once, reports events applied."""

    def __init__(self, first_offer: list[dict[str, Any]], wait_s: int = 0) -> None:
        self.first_offer = first_offer
        self.wait_s = wait_s
        self.polls = 0
        self.poll_paths: list[str] = []
        self.batches: list[list[dict[str, Any]]] = []

    def __call__(self, method: str, path: str, body: bytes | None) -> Reply:
        if method == "POST" and path == "/v1/events":
            assert body is not None
            events = json.loads(body)["events"]
            self.batches.append(events)
            return accepted([e["id"] for e in events])
        if method == "GET" and path.startswith("/v1/commands"):
            # The API accepts only a whole number of seconds.
            assert path.startswith(f"/v1/commands?wait={self.wait_s}")
            self.poll_paths.append(path)
            self.polls += 1
            offer = self.first_offer if self.polls == 1 else []
            return Reply(200, json.dumps({"commands": offer, "next_poll_s": 0.05}).encode())
        if method == "GET" and path.startswith("/v1/events/"):
            event_id = path.rsplit("/", 1)[1]
            return Reply(200, json.dumps({"id": event_id, "status": "applied"}).encode())
        raise AssertionError(f"unexpected {method} {path}")

    def events(self) -> list[dict[str, Any]]:
        return [event for batch in self.batches for event in batch]


async def test_agent_boots_applies_commands_and_reports() -> None:
    offer = [
        command(7, epoch=2, version="2.0.0").model_dump(),
        command(8, epoch=1, version="0.1.0").model_dump(),  # a zombie's command
        command(7, epoch=2, version="2.0.0").model_dump(),  # re-offered in the same reply
    ]
    edge = FakeEdge(offer)
    stats = Stats(0.0)
    config = SimConfig(heartbeat_s=0.2, poll_wait_s=0, resources=2)
    agent = SimAgent(
        IDENTITY,
        config,
        ScriptedTransport(handler=edge),
        stats,
        ZeroRandom(),
        policy=RetryPolicy(sleep=RecordingSleep()),
    )
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: any(e["type"] == "command_result" for e in edge.events()))
        await until(lambda: stats.samples_applied >= 3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    # Boot: full state first, then a heartbeat, in the first batch.
    assert [e["type"] for e in edge.batches[0][:2]] == ["observed_state", "heartbeat"]
    events = edge.events()
    EventBatch.model_validate({"events": events[:500]})
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))

    results = [e for e in events if e["type"] == "command_result"]
    assert [(r["payload"]["command_id"], r["payload"]["epoch"]) for r in results] == [(7, 2)]
    assert results[0]["payload"]["outcome"] == "succeeded"
    after = events[events.index(results[0]) + 1]
    assert after["type"] == "observed_state"
    versions = {(r["kind"], r["name"]): r["version"] for r in after["payload"]["resources"]}
    assert versions[("deployment", "res-0")] == "2.0.0"

    assert stats.commands["delivered"] == 3
    assert stats.commands["applied"] == 1
    assert stats.commands["stale_epoch_ignored"] == 1
    assert stats.commands["duplicate_ignored"] == 1
    assert stats.agents_running == 0
    assert stats.errors == {}
    # Once it took command 7, every poll names it: the server offers it no more.
    assert edge.poll_paths[0] == "/v1/commands?wait=0"
    assert set(edge.poll_paths[1:]) == {"/v1/commands?wait=0&taken=7"}


async def test_poll_route_missing_is_counted_not_retried_in_a_storm() -> None:
    edge = FakeEdge([])

    def no_commands_route(method: str, path: str, body: bytes | None) -> Reply:
        if path.startswith("/v1/commands"):
            return Reply(404, b'{"title": "Not Found"}')
        return edge(method, path, body)

    stats = Stats(0.0)
    sleep = RecordingSleep()
    agent = SimAgent(
        IDENTITY,
        SimConfig(heartbeat_s=60),
        ScriptedTransport(handler=no_commands_route),
        stats,
        random.Random(2),
        policy=RetryPolicy(sleep=sleep),
    )
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: stats.errors["commands:404"] >= 1 and len(edge.batches) >= 1)
        await asyncio.sleep(0.2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # One 404, then the agent waits seconds before asking again; no tenacity retries.
    assert stats.errors["commands:404"] == 1
    assert sleep.delays == []
    assert stats.events_accepted == 2


@pytest.mark.parametrize("status", ["applied", "rejected"])
async def test_sampled_events_measure_accept_to_verdict(status: str) -> None:
    def edge(method: str, path: str, body: bytes | None) -> Reply:
        if method == "POST":
            return accepted()
        if path.startswith("/v1/commands"):
            return Reply(200, b'{"commands": [], "next_poll_s": 60}')
        return Reply(200, json.dumps({"id": "x", "status": status}).encode())

    stats = Stats(0.0)
    agent = SimAgent(
        IDENTITY, SimConfig(heartbeat_s=60), ScriptedTransport(handler=edge), stats, ZeroRandom()
    )
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: stats.samples_applied + stats.samples_rejected == 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert stats.samples_tracked == 2
    assert (stats.samples_applied if status == "applied" else stats.samples_rejected) == 2
    assert stats.apply_latency.count == 2


async def test_queued_events_are_coalesced_within_the_size_budget() -> None:
    edge = FakeEdge([])
    stats = Stats(0.0)
    # 1000 resources make each observed_state ~70 KB: eight of them exceed 512 KiB.
    config = SimConfig(heartbeat_s=60, resources=1000)
    agent = SimAgent(IDENTITY, config, ScriptedTransport(handler=edge), stats, random.Random(5))
    for _ in range(20):
        agent._outbox.put_nowait(agent.events.observed_state(agent.state.observed()))
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: stats.events_accepted == 22)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    sizes = [len(json.dumps({"events": b}, separators=(",", ":"))) for b in edge.batches]
    assert len(edge.batches) > 1
    assert max(sizes) <= 512 * 1024 + 100
    assert [e["seq"] for e in edge.events()] == list(range(1, 23))


async def test_a_stopped_agent_sends_what_it_queued_through_overload_and_ends() -> None:
    """stop(): no new events, the queued ones retried past 503s until accepted, no abandon."""
    posts: list[list[str]] = []
    shed = 3

    def edge(method: str, path: str, body: bytes | None) -> Reply:
        nonlocal shed
        if method == "GET" and path.startswith("/v1/commands"):
            return Reply(200, json.dumps({"commands": [], "next_poll_s": 30}).encode())
        assert method == "POST"
        assert body is not None
        if shed > 0:
            if shed == 3:
                agent.stop()  # the stop comes while the boot batch is being shed
            shed -= 1
            return Reply(503, b'{"status":503}', retry_after="1")
        ids = [event["id"] for event in json.loads(body)["events"]]
        posts.append(ids)
        return accepted(ids)

    stats = Stats(0.0)
    sleep = RecordingSleep()
    agent = SimAgent(
        IDENTITY,
        SimConfig(heartbeat_s=3600, poll_wait_s=0),
        ScriptedTransport(handler=edge),
        stats,
        ZeroRandom(),
        policy=RetryPolicy(sleep=sleep),
    )
    await asyncio.wait_for(agent.run(), 5)

    assert [len(ids) for ids in posts] == [2]  # the boot batch, accepted on the 4th try
    assert stats.abandoned_batches == 0
    assert stats.retries == 3
    # Every wait honoured the server's Retry-After.
    assert sleep.delays
    assert min(sleep.delays) >= 1.0
    assert stats.agents_running == 0

"""Long-poll logic without a database: wake-ups per environment, no lost wake-up, deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.api.longpoll import (
    DEFAULT_WAIT_S,
    MAX_TAKEN,
    NEXT_POLL_S,
    CommandPoller,
    CommandSignals,
    next_poll_delay,
    parse_payload,
    parse_taken,
    parse_wait,
)
from services.api.repository import PendingCommands
from services.shared.commands import MAX_WAIT_S, Command, CommandResource
from services.shared.problems import ValidationFailed
from tests.support.waiting import until

from .conftest import FakeRepository


def command(command_id: int = 1, action: str = "create") -> Command:
    return Command.model_validate(
        {
            "id": command_id,
            "epoch": 3,
            "revision": 2,
            "action": action,
            "resource": CommandResource(
                kind="app", name="web", version=None if action == "delete" else "1.0"
            ),
            "attempt": 1,
        }
    )


@pytest.mark.parametrize(
    ("values", "expected"), [([], DEFAULT_WAIT_S), (["0"], 0), ([str(MAX_WAIT_S)], MAX_WAIT_S)]
)
def test_wait_values(values: list[str], expected: int) -> None:
    assert parse_wait(values) == expected


@pytest.mark.parametrize(
    "values",
    [[str(MAX_WAIT_S + 1)], ["-1"], ["+1"], ["1.5"], [""], ["abc"], ["1", "2"], ["٣"], [" 1"]],
)
def test_invalid_wait_is_422_naming_wait(values: list[str]) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_wait(values)
    assert [e.field for e in caught.value.errors] == ["wait"]


def test_next_poll_delay_is_jittered_within_range() -> None:
    delays = {next_poll_delay() for _ in range(200)}
    assert all(NEXT_POLL_S[0] <= d <= NEXT_POLL_S[1] for d in delays)
    assert len(delays) > 50
    assert next_poll_delay(lambda low, high: low) == NEXT_POLL_S[0]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("acme/prod", ("acme", "prod")),
        ("acme", None),
        ("acme/prod/x", None),
        ("ACME/prod", None),
        ("/prod", None),
        ("", None),
    ],
)
def test_payload(payload: str, expected: tuple[str, str] | None) -> None:
    assert parse_payload(payload) == expected


# --- CommandSignals ---------------------------------------------------------------


async def test_notification_wakes_only_its_environment() -> None:
    signals = CommandSignals()
    with (
        signals.subscribe("acme", "prod") as prod,
        signals.subscribe("acme", "prod") as prod_2,
        signals.subscribe("acme", "staging") as staging,
        signals.subscribe("other", "prod") as other,
    ):
        assert signals.waiting == 4
        assert signals.notify_payload("acme/prod") == 2
        assert prod.signalled
        assert prod_2.signalled
        assert not staging.signalled
        assert not other.signalled
        assert signals.notify_payload("garbage") == 0
        assert signals.notify("nobody", "prod") == 0
        assert signals.wake_all() == 4
        assert staging.signalled
        assert other.signalled
    assert signals.waiting == 0
    assert signals._waiting == {}


async def test_a_signal_before_the_wait_is_not_lost() -> None:
    signals = CommandSignals()
    with signals.subscribe("acme", "prod") as subscription:
        signals.notify("acme", "prod")
        started = time.monotonic()
        assert await subscription.wait(5) is True
        assert time.monotonic() - started < 0.1
        subscription.clear()
        assert await subscription.wait(0.05) is False
        assert await subscription.wait(0) is False


async def test_thousands_of_waiters_are_cheap_and_woken_selectively() -> None:
    signals = CommandSignals()
    woken: list[int] = []

    async def wait(index: int) -> None:
        with signals.subscribe("acme", f"env-{index % 100}") as subscription:
            if await subscription.wait(10):
                woken.append(index)

    tasks = [asyncio.create_task(wait(i)) for i in range(2000)]
    await until(lambda: signals.waiting == 2000, what="2000 waiters subscribed")
    started = time.perf_counter()
    assert signals.notify("acme", "env-7") == 20
    assert time.perf_counter() - started < 0.01
    await until(lambda: len(woken) == 20, what="the 20 notified waiters woken")
    assert sorted(woken) == list(range(7, 2000, 100))
    assert signals.wake_all() == 1980
    await asyncio.gather(*tasks)
    assert len(woken) == 2000
    assert signals.waiting == 0


# --- CommandPoller ----------------------------------------------------------------


def poller(repository: FakeRepository, signals: CommandSignals) -> CommandPoller:
    return CommandPoller(repository, signals, uniform=lambda low, high: 0.75)


async def test_returns_at_once_when_commands_exist() -> None:
    repository = FakeRepository(commands={("acme", "prod"): [command(1), command(2)]})
    started = time.monotonic()
    reply = await poller(repository, CommandSignals()).poll("acme", "prod", 20)
    assert time.monotonic() - started < 0.1
    assert [c.id for c in reply.commands] == [1, 2]
    assert reply.next_poll_s == 0
    assert repository.command_queries == [("acme", "prod")]


async def test_waiting_poll_is_woken_by_its_environment_only() -> None:
    repository = FakeRepository()
    signals = CommandSignals()
    task = asyncio.create_task(poller(repository, signals).poll("acme", "prod", 10))
    await until(lambda: signals.waiting == 1, what="the poll waiting")
    assert repository.command_queries == [("acme", "prod")]

    # Another environment's commands and notification: not woken, no query.
    repository.commands[("acme", "staging")] = [command(5)]
    assert signals.notify_payload("acme/staging") == 0
    await asyncio.sleep(0.05)  # sleep-ok: shows that nothing happens in that time
    assert not task.done()
    assert len(repository.command_queries) == 1

    started = time.monotonic()
    repository.commands[("acme", "prod")] = [command(7)]
    assert signals.notify_payload("acme/prod") == 1
    reply = await asyncio.wait_for(task, 1)
    assert time.monotonic() - started < 0.1
    assert [c.id for c in reply.commands] == [7]
    assert reply.next_poll_s == 0
    assert signals.waiting == 0


async def test_empty_at_the_deadline_without_querying_in_a_loop() -> None:
    repository = FakeRepository()
    signals = CommandSignals()
    started = time.monotonic()
    reply = await poller(repository, signals).poll("acme", "prod", 1)
    elapsed = time.monotonic() - started
    assert 0.95 <= elapsed < 1.3
    assert reply.commands == []
    assert reply.next_poll_s == 0.75
    assert len(repository.command_queries) == 1


async def test_wait_zero_answers_at_once() -> None:
    repository = FakeRepository()
    reply = await poller(repository, CommandSignals()).poll("acme", "prod", 0)
    assert reply.commands == []
    assert len(repository.command_queries) == 1


async def test_a_notification_that_finds_nothing_keeps_the_poll_waiting() -> None:
    repository = FakeRepository()
    signals = CommandSignals()
    task = asyncio.create_task(poller(repository, signals).poll("acme", "prod", 0.6))
    await until(lambda: signals.waiting == 1, what="the poll waiting")
    signals.notify("acme", "prod")  # e.g. a command already superseded
    await until(lambda: len(repository.command_queries) == 2, what="the second query")
    assert not task.done()
    reply = await asyncio.wait_for(task, 1)
    assert reply.commands == []


async def test_notification_during_the_query_is_not_lost() -> None:
    """The subscription exists before the first query, so a NOTIFY racing it still counts."""
    signals = CommandSignals()

    class RacingRepository(FakeRepository):
        async def pending_commands(self, customer_id: str, environment_id: str) -> PendingCommands:
            found = await super().pending_commands(customer_id, environment_id)
            if len(self.command_queries) == 1:
                # The controller commits and notifies after our snapshot was taken.
                self.commands[("acme", "prod")] = [command(9)]
                signals.notify("acme", "prod")
            return found

    repository = RacingRepository()
    started = time.monotonic()
    reply = await poller(repository, signals).poll("acme", "prod", 5)
    assert time.monotonic() - started < 0.2
    assert [c.id for c in reply.commands] == [9]


async def test_held_back_command_wakes_the_poll_when_due() -> None:
    repository = FakeRepository(next_due_in_s={("acme", "prod"): 0.2})
    signals = CommandSignals()
    task = asyncio.create_task(poller(repository, signals).poll("acme", "prod", 5))
    await until(lambda: signals.waiting == 1, what="the poll waiting")
    repository.commands[("acme", "prod")] = [command(4)]
    del repository.next_due_in_s[("acme", "prod")]
    started = time.monotonic()
    reply = await asyncio.wait_for(task, 1)
    assert 0.1 <= time.monotonic() - started < 0.4
    assert [c.id for c in reply.commands] == [4]


async def test_wake_all_makes_every_poll_query_again() -> None:
    repository = FakeRepository()
    signals = CommandSignals()
    tasks = [
        asyncio.create_task(poller(repository, signals).poll("acme", f"env-{i}", 5))
        for i in range(3)
    ]
    await until(lambda: signals.waiting == 3, what="three polls waiting")
    repository.commands[("acme", "env-1")] = [command(1)]
    assert signals.wake_all() == 3
    await until(lambda: len(repository.command_queries) == 6, what="every poll queried again")
    assert tasks[1].done()
    assert [c.id for c in tasks[1].result().commands] == [1]
    signals.close()
    replies = await asyncio.wait_for(asyncio.gather(tasks[0], tasks[2]), 1)
    assert all(r.commands == [] for r in replies)


async def test_after_close_polls_do_not_wait() -> None:
    repository = FakeRepository()
    signals = CommandSignals()
    signals.close()
    started = time.monotonic()
    reply = await poller(repository, signals).poll("acme", "prod", 5)
    assert time.monotonic() - started < 0.1
    assert reply.commands == []


async def test_database_errors_propagate_and_unsubscribe() -> None:
    repository = FakeRepository(error=OSError("down"))
    signals = CommandSignals()
    with pytest.raises(OSError, match="down"):
        await poller(repository, signals).poll("acme", "prod", 5)
    assert signals.waiting == 0


class GatedRepository(FakeRepository):
    """Queries stay in flight until ``gate`` opens, so polls can find them running."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def pending_commands(self, customer_id: str, environment_id: str) -> PendingCommands:
        found = await super().pending_commands(customer_id, environment_id)
        await self.gate.wait()
        return PendingCommands(
            list(self.commands.get((customer_id, environment_id), [])),
            found.next_due_in_s,
            found.due_for_s,
        )


async def test_polls_woken_by_one_notification_share_one_query() -> None:
    """A hundred agents of one environment woken at once cost one query, not a hundred."""
    repository = GatedRepository()
    repository.gate.set()
    signals = CommandSignals()
    answering = poller(repository, signals)
    polls = [asyncio.create_task(answering.poll("acme", "prod", 10)) for _ in range(100)]
    await until(lambda: signals.waiting == 100, what="100 polls waiting")
    # Arriving together, the polls already shared their first queries.
    first = len(repository.command_queries)
    assert first < 100
    repository.gate.clear()
    repository.commands[("acme", "prod")] = [command(7)]
    assert signals.notify_payload("acme/prod") == 100
    await until(lambda: len(repository.command_queries) > first, what="the woken query")
    repository.gate.set()
    replies = await asyncio.wait_for(asyncio.gather(*polls), 2)
    assert {tuple(c.id for c in reply.commands) for reply in replies} == {(7,)}
    assert len(repository.command_queries) == first + 1


async def test_a_query_started_before_a_notification_is_not_shared_after_it() -> None:
    """A poll needs a query that started after the signals it consumed (or after it arrived,
    for its first query): an older one may have missed the change."""
    repository = GatedRepository()
    signals = CommandSignals()
    answering = poller(repository, signals)
    early = asyncio.create_task(answering.poll("acme", "prod", 0))
    await until(lambda: len(repository.command_queries) == 1, what="the first query")
    # The controller commits a command and notifies while that query is in flight.
    repository.commands[("acme", "prod")] = [command(8)]
    signals.notify("acme", "prod")
    late = asyncio.create_task(answering.poll("acme", "prod", 0))
    await until(lambda: len(repository.command_queries) == 2, what="a query of its own")
    repository.gate.set()
    reply = await asyncio.wait_for(late, 1)
    assert [c.id for c in reply.commands] == [8]
    await asyncio.wait_for(early, 1)


async def test_a_shared_query_outlives_a_poll_that_stops_waiting() -> None:
    repository = GatedRepository()
    signals = CommandSignals()
    answering = poller(repository, signals)
    first = asyncio.create_task(answering.poll("acme", "prod", 5))
    second = asyncio.create_task(answering.poll("acme", "prod", 5))
    await until(lambda: len(repository.command_queries) == 1, what="the shared query")
    await asyncio.sleep(0)  # sleep-ok: lets the second poll join the query in flight
    first.cancel()
    repository.commands[("acme", "prod")] = [command(3)]
    repository.gate.set()
    reply = await asyncio.wait_for(second, 1)
    assert [c.id for c in reply.commands] == [3]
    assert len(repository.command_queries) == 1


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], frozenset()),
        (["7"], {7}),
        (["1,2,2,9223372036854775807"], {1, 2, 2**63 - 1}),
        # What the OpenAPI pattern admits is accepted; no command has such an id.
        (["0,007,9999999999999999999"], {0, 7, 10**19 - 1}),
    ],
)
def test_taken_values(values: list[str], expected: set[int]) -> None:
    assert parse_taken(values) == expected


@pytest.mark.parametrize(
    "values",
    [
        [""],
        ["1,"],
        [",1"],
        ["1 ,2"],
        ["-1"],
        ["+1"],
        ["12345678901234567890"],
        ["1", "2"],
        [",".join(["1"] * (MAX_TAKEN + 1))],
        ["٣"],
    ],
)
def test_invalid_taken_is_422_naming_taken(values: list[str]) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_taken(values)
    assert [e.field for e in caught.value.errors] == ["taken"]


async def test_commands_the_agent_took_are_not_offered_again_and_the_poll_is_held() -> None:
    """Until an agent's results apply, its next polls would get the same commands back at
    once; with ``taken`` they wait for something new instead."""
    repository = FakeRepository(commands={("acme", "prod"): [command(1), command(2)]})
    signals = CommandSignals()
    answering = poller(repository, signals)
    reply = await answering.poll("acme", "prod", 5, frozenset({1}))
    assert [c.id for c in reply.commands] == [2]
    held = asyncio.create_task(answering.poll("acme", "prod", 5, frozenset({1, 2})))
    await until(lambda: signals.waiting == 1, what="the poll held")
    repository.commands[("acme", "prod")] = [command(1), command(2), command(3)]
    signals.notify("acme", "prod")
    reply = await asyncio.wait_for(held, 1)
    assert [c.id for c in reply.commands] == [3]
    # Without taken (an agent that restarted), everything pending is offered.
    reply = await answering.poll("acme", "prod", 0)
    assert [c.id for c in reply.commands] == [1, 2, 3]

"""Command delivery latency: each offer counted once per process, split by when it became due."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from services.api.delivery import CommandDeliveries, DeliveryLedger
from services.api.longpoll import CommandPoller, CommandSignals
from services.shared import metrics as specs
from services.shared.commands import Command, CommandResource
from tests.support.waiting import eventually

from .conftest import FakeRepository

METRIC = "fleetplane_api_command_delivery_seconds"


def command(command_id: int, attempt: int = 1) -> Command:
    return Command(
        id=command_id,
        epoch=1,
        revision=1,
        action="create",
        resource=CommandResource(kind="app", name="web", version="1.0"),
        attempt=attempt,
    )


def deliveries(capacity: int = 100) -> tuple[CommandDeliveries, CollectorRegistry]:
    registry = CollectorRegistry()
    histogram = specs.histogram(registry, specs.API_COMMAND_DELIVERY)
    return CommandDeliveries(histogram, DeliveryLedger(capacity)), registry


def count(registry: CollectorRegistry, became_due: str) -> float:
    value = registry.get_sample_value(f"{METRIC}_count", {"became_due": became_due})
    assert value is not None
    return value


def total(registry: CollectorRegistry, became_due: str) -> float:
    value = registry.get_sample_value(f"{METRIC}_sum", {"became_due": became_due})
    assert value is not None
    return value


def test_ledger_counts_an_offer_once_and_a_new_attempt_again() -> None:
    ledger = DeliveryLedger(10)
    assert ledger.first_hand_out(7, 1)
    assert not ledger.first_hand_out(7, 1)
    assert not ledger.first_hand_out(7, 1)
    assert ledger.first_hand_out(7, 2)  # re-offered: a new offer
    assert ledger.first_hand_out(8, 1)
    assert len(ledger) == 3


def test_ledger_is_bounded_and_forgets_the_least_recently_handed_out() -> None:
    ledger = DeliveryLedger(3)
    for command_id in (1, 2, 3):
        assert ledger.first_hand_out(command_id, 1)
    assert not ledger.first_hand_out(1, 1)  # 1 is now the newest
    assert ledger.first_hand_out(4, 1)  # evicts 2, the oldest
    assert len(ledger) == 3
    assert not ledger.first_hand_out(1, 1)
    assert not ledger.first_hand_out(3, 1)
    assert ledger.first_hand_out(2, 1)  # forgotten, so counted again (documented)
    with pytest.raises(ValueError, match="capacity"):
        DeliveryLedger(0)


def test_both_series_exist_before_any_command() -> None:
    _, registry = deliveries()
    assert count(registry, "during_poll") == 0
    assert count(registry, "before_poll") == 0


def test_repeated_hand_outs_observe_once_and_split_by_when_the_offer_became_due() -> None:
    recorder, registry = deliveries()
    # Offer 1 became due 0.02 s ago in a poll open for 3 s; offer 2 was due 5 s ago,
    # before this 3 s poll arrived.
    assert recorder.handed_out([command(1), command(2)], [0.02, 5.0], poll_open_s=3.0) == 2
    # The agent polls again before its results are applied: the same offers, no count.
    assert recorder.handed_out([command(1), command(2)], [0.5, 5.5], poll_open_s=0.1) == 0
    # A re-offer of command 1 is a new offer.
    assert recorder.handed_out([command(1, attempt=2)], [0.03], poll_open_s=10.0) == 1
    assert count(registry, "during_poll") == 2
    assert count(registry, "before_poll") == 1
    assert total(registry, "during_poll") == pytest.approx(0.05)
    assert total(registry, "before_poll") == pytest.approx(5.0)


def test_a_clock_skewed_negative_age_counts_as_zero_and_missing_ages_are_skipped() -> None:
    recorder, registry = deliveries()
    assert recorder.handed_out([command(1)], [-0.004], poll_open_s=1.0) == 1
    assert total(registry, "during_poll") == 0
    assert recorder.handed_out([command(2)], [], poll_open_s=1.0) == 0
    assert count(registry, "during_poll") + count(registry, "before_poll") == 1


async def test_the_poller_observes_each_offer_once_across_polls() -> None:
    """Two agents of one environment poll the same pending commands: one observation each."""
    recorder, registry = deliveries()
    repository = FakeRepository(
        commands={("acme", "prod"): [command(1), command(2)]},
        due_for_s={("acme", "prod"): (0.0, 30.0)},
    )
    poller = CommandPoller(repository, CommandSignals(), deliveries=recorder)
    for _ in range(3):
        reply = await poller.poll("acme", "prod", 5)
        assert [c.id for c in reply.commands] == [1, 2]
    assert count(registry, "during_poll") == 1  # due as the poll queried
    assert count(registry, "before_poll") == 1  # due 30 s before the poll arrived
    assert total(registry, "before_poll") >= 30.0


async def test_a_command_that_arrives_while_the_poll_waits_is_during_poll() -> None:
    recorder, registry = deliveries()
    repository = FakeRepository()
    signals = CommandSignals()
    poller = CommandPoller(repository, signals, deliveries=recorder)
    task = asyncio.create_task(poller.poll("acme", "prod", 5))

    async def queries() -> int:
        return len(repository.command_queries)

    # Until the poll has queried (and found nothing): it waits now.
    await eventually(queries, lambda n: n >= 1, timeout_s=2, interval_s=0.01, what="first query")
    repository.commands[("acme", "prod")] = [command(3)]
    repository.due_for_s[("acme", "prod")] = (0.0,)
    signals.notify("acme", "prod")
    reply = await asyncio.wait_for(task, 2)
    assert [c.id for c in reply.commands] == [3]
    assert count(registry, "during_poll") == 1
    assert count(registry, "before_poll") == 0
    assert total(registry, "during_poll") < 0.2

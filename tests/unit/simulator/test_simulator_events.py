"""Built events are valid per the agent contract; seq and ids behave per boot."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bench.simulator.config import SimConfig
from bench.simulator.events import EventFactory, Resource, new_boot_id
from services.shared.events import EventBatch, ObservedStateEvent


def _all_kinds(factory: EventFactory) -> list[dict[str, object]]:
    return [
        factory.observed_state([Resource("deployment", "res-0", "1.0.0")]),
        factory.heartbeat(),
        factory.command_result(42, 7, "succeeded"),
        factory.command_result(43, 7, "failed", "simulated failure"),
        factory.observed_state([]),
    ]


def test_built_events_validate_against_the_batch_contract() -> None:
    events = _all_kinds(EventFactory())
    batch = EventBatch.model_validate({"events": events})
    assert [e.type for e in batch.events] == [
        "observed_state",
        "heartbeat",
        "command_result",
        "command_result",
        "observed_state",
    ]
    first = batch.events[0]
    assert isinstance(first, ObservedStateEvent)
    assert first.payload.resources[0].version == "1.0.0"


def test_validation_would_catch_a_broken_builder() -> None:
    # Guards the test above: the contract really rejects what a careless builder makes.
    event = EventFactory().heartbeat()
    event["payload"] = {"agent_version": "latest", "health": "ok"}
    with pytest.raises(ValidationError):
        EventBatch.model_validate({"events": [event]})


def test_seq_starts_at_one_and_grows_by_one_within_a_boot() -> None:
    factory = EventFactory()
    events = _all_kinds(factory) + _all_kinds(factory)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert {e["boot_id"] for e in events} == {factory.boot_id}
    assert factory.last_seq == len(events)


def test_a_new_boot_restarts_seq_with_a_new_boot_id_and_fresh_ids() -> None:
    first, second = EventFactory(), EventFactory()
    a = [first.heartbeat() for _ in range(3)]
    b = [second.heartbeat() for _ in range(3)]
    assert first.boot_id != second.boot_id
    assert [e["seq"] for e in b] == [1, 2, 3]
    assert not {e["id"] for e in a} & {e["id"] for e in b}


def test_event_ids_are_unique_within_a_boot() -> None:
    factory = EventFactory()
    ids = [factory.heartbeat()["id"] for _ in range(1000)]
    assert len(set(ids)) == 1000


def test_boot_ids_do_not_depend_on_the_seed() -> None:
    # A rerun with the same --seed must not repeat ids, or dedup would drop the run.
    assert new_boot_id() != new_boot_id()


def test_identities_spread_over_customers_and_environments() -> None:
    config = SimConfig(agents=10, customers=2, environments_per_customer=3)
    identities = list(config.identities())
    assert [i.agent_id for i in identities] == [f"agent-{k}" for k in range(10)]
    assert {i.customer_id for i in identities} == {"cust-0", "cust-1"}
    assert {(i.customer_id, i.environment_id) for i in identities} == {
        (f"cust-{c}", f"env-{e}") for c in range(2) for e in range(3)
    }
    assert identities[0].customer_id == "cust-0"
    assert identities[1].customer_id == "cust-1"

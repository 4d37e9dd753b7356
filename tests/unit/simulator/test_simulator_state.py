"""The agent's command rules: epoch fencing, re-offers, applying to resources."""

from __future__ import annotations

import random

import pytest

from bench.simulator.events import Resource
from bench.simulator.state import AgentState, Decision, run_command

from .fakes import command


def test_older_epoch_is_ignored_after_a_newer_one() -> None:
    state = AgentState()
    assert state.admit(command(1, epoch=5)) is Decision.APPLY
    assert state.admit(command(2, epoch=4)) is Decision.STALE_EPOCH
    assert state.newest_epoch == 5


def test_equal_and_newer_epochs_are_applied_and_tracked() -> None:
    state = AgentState()
    assert state.admit(command(1, epoch=3)) is Decision.APPLY
    assert state.admit(command(2, epoch=3)) is Decision.APPLY
    assert state.newest_epoch == 3
    assert state.admit(command(3, epoch=7)) is Decision.APPLY
    assert state.newest_epoch == 7
    # The fence moved: what was current a moment ago is now a zombie's command.
    assert state.admit(command(4, epoch=3)) is Decision.STALE_EPOCH
    assert state.newest_epoch == 7


def test_first_command_of_any_epoch_is_applied() -> None:
    state = AgentState()
    assert state.admit(command(1, epoch=0)) is Decision.APPLY
    assert state.newest_epoch == 0


def test_stale_command_does_not_lower_the_newest_epoch() -> None:
    state = AgentState()
    state.admit(command(1, epoch=9))
    state.admit(command(2, epoch=2))
    assert state.newest_epoch == 9


def test_reoffered_command_id_is_not_applied_twice() -> None:
    state = AgentState()
    first = command(11, epoch=1, version="2.0.0")
    assert state.admit(first) is Decision.APPLY
    assert state.admit(first.model_copy(update={"attempt": 2})) is Decision.DUPLICATE
    assert state.admit(first.model_copy(update={"attempt": 3})) is Decision.DUPLICATE


def test_stale_command_is_not_remembered_as_taken() -> None:
    # A stale offer was never applied, so it stays stale (not "duplicate") when re-offered.
    state = AgentState()
    state.admit(command(1, epoch=5))
    assert state.admit(command(2, epoch=1)) is Decision.STALE_EPOCH
    assert state.admit(command(2, epoch=1)) is Decision.STALE_EPOCH


def test_create_update_set_version_and_delete_removes() -> None:
    state = AgentState({("deployment", "res-0"): "1.0.0"})
    assert state.apply(command(1, 1, action="update", version="1.1.0")) is None
    created = command(2, 1, action="create", kind="service", name="web", version="3")
    assert state.apply(created) is None
    assert state.resources == {("deployment", "res-0"): "1.1.0", ("service", "web"): "3"}
    assert state.apply(command(3, 1, action="delete", version=None)) is None
    assert state.resources == {("service", "web"): "3"}
    # Deleting what is already gone is fine: applying is idempotent.
    assert state.apply(command(4, 1, action="delete", version=None)) is None


def test_update_without_version_fails_and_changes_nothing() -> None:
    state = AgentState({("deployment", "res-0"): "1.0.0"})
    outcome, message = run_command(state, command(1, 1, version=None), simulate_failure=False)
    assert (outcome, message) == ("failed", "update without a version")
    assert state.resources == {("deployment", "res-0"): "1.0.0"}


def test_simulated_failure_leaves_resources_untouched() -> None:
    state = AgentState({("deployment", "res-0"): "1.0.0"})
    outcome, _ = run_command(state, command(1, 1, version="9.9.9"), simulate_failure=True)
    assert outcome == "failed"
    assert state.resources == {("deployment", "res-0"): "1.0.0"}
    assert run_command(state, command(2, 1, version="9.9.9"), simulate_failure=False) == (
        "succeeded",
        "",
    )
    assert state.resources == {("deployment", "res-0"): "9.9.9"}


@pytest.mark.parametrize("count", [0, 1, 3, 10])
def test_initial_resources_are_distinct_and_observed_in_order(count: int) -> None:
    state = AgentState.with_initial_resources(count, random.Random(1))
    observed = state.observed()
    assert len(observed) == count
    assert observed == sorted(observed)
    assert len({(r.kind, r.name) for r in observed}) == count
    assert all(isinstance(r, Resource) for r in observed)

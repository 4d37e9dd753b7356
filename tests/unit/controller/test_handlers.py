"""The controller's planning logic: sequencing, deduplication, command results, poison."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.controller.handlers import (
    PREVIOUS_BOOTS_KEPT,
    AgentState,
    CommandRow,
    Decoded,
    DecodedChange,
    Delivered,
    KnownState,
    PendingCommand,
    Poison,
    decode,
    plan_batch,
    reconcile,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
A1 = ("c1", "e1", "a1")
"""The default agent's whole identity: (customer, environment, agent)."""


def record(
    event_id: str,
    seq: int,
    *,
    boot: str = "boot-1",
    kind: str = "heartbeat",
    payload: dict[str, Any] | None = None,
    customer: str = "c1",
    env: str = "e1",
    agent: str = "a1",
    at: datetime = T0,
) -> dict[str, Any]:
    if payload is None:
        payload = {"agent_version": "1.2.3", "health": "ok"}
    return {
        "schema_version": 1,
        "kind": "agent_event",
        "customer_id": customer,
        "environment_id": env,
        "agent_id": agent,
        "accepted_at": at.isoformat(),
        "event": {"id": event_id, "boot_id": boot, "seq": seq, "type": kind, "payload": payload},
    }


def delivered(
    value: dict[str, Any] | bytes | None, offset: int = 0, key: bytes = b"c1"
) -> Delivered:
    raw = json.dumps(value).encode() if isinstance(value, dict) else value
    return Delivered(partition=3, offset=offset, key=key, value=raw)


def decoded_batch(*records: dict[str, Any]) -> list[Decoded]:
    batch = []
    for offset, r in enumerate(records):
        result = decode(delivered(r, offset, key=r["customer_id"].encode()))
        assert isinstance(result, Decoded), result
        batch.append(result)
    return batch


def known(
    recorded: set[tuple[str, str, str, str]] | None = None,
    agents: dict[tuple[str, str, str], AgentState] | None = None,
    commands: dict[int, CommandRow] | None = None,
) -> KnownState:
    return KnownState(frozenset(recorded or ()), agents or {}, commands or {})


def test_consecutive_sequence_applies_and_first_boot_requests_resync() -> None:
    plan = plan_batch(decoded_batch(record("e1", 1), record("e2", 2), record("e3", 3)), known())
    assert [o.status for o in plan.outcomes] == ["applied"] * 3
    state = plan.agents[A1]
    assert (state.boot_id, state.last_seq) == ("boot-1", 3)
    assert state.resync_reason == "new_boot"
    assert plan.resync_requests == ["new_boot"]


def test_observed_state_satisfies_a_pending_resync() -> None:
    observed = {"resources": [{"name": "web", "kind": "deployment", "version": "1.0.0"}]}
    plan = plan_batch(
        decoded_batch(record("e1", 1), record("e2", 2, kind="observed_state", payload=observed)),
        known(),
    )
    state = plan.agents[A1]
    assert state.resync_requested_at is None
    delta = plan.environments[("c1", "e1")]
    assert delta.observed_reports == 1
    assert delta.observed_state == [
        {"name": "web", "kind": "deployment", "version": "1.0.0", "status": ""}
    ]


def test_gap_applies_and_requests_resync() -> None:
    agents = {A1: AgentState("boot-1", 5, T0)}
    plan = plan_batch(decoded_batch(record("e9", 9)), known(agents=agents))
    assert plan.outcomes[0].status == "applied"
    assert plan.agents[A1].resync_reason == "sequence_gap"
    assert plan.resync_requests == ["sequence_gap"]


def test_stale_sequence_is_rejected_with_reason_and_changes_nothing() -> None:
    agents = {A1: AgentState("boot-1", 5, T0)}
    plan = plan_batch(decoded_batch(record("old", 4)), known(agents=agents))
    assert plan.outcomes[0].status == "rejected"
    assert plan.outcomes[0].reason is not None
    assert "stale sequence 4" in plan.outcomes[0].reason
    assert plan.agents == {}
    assert plan.environments == {}


def test_new_boot_restarts_sequence() -> None:
    agents = {A1: AgentState("boot-1", 50, T0)}
    plan = plan_batch(decoded_batch(record("x", 1, boot="boot-2")), known(agents=agents))
    assert plan.outcomes[0].status == "applied"
    assert plan.agents[A1].boot_id == "boot-2"
    assert plan.resync_requests == ["new_boot"]


def test_already_recorded_and_repeated_ids_are_skipped_once_each() -> None:
    batch = decoded_batch(record("e1", 1), record("e2", 2), record("e2", 2))
    plan = plan_batch(batch, known(recorded={("c1", "e1", "a1", "e1")}))
    assert [o.decoded.record.event.id for o in plan.outcomes] == ["e2"]
    assert plan.duplicates == 2


def test_same_event_id_of_two_agents_is_not_a_duplicate() -> None:
    plan = plan_batch(decoded_batch(record("e1", 1), record("e1", 1, agent="a2")), known())
    assert len(plan.outcomes) == 2


def test_heartbeats_keep_the_latest_time_and_last_version() -> None:
    later = T0 + timedelta(seconds=5)
    batch = decoded_batch(
        record("e1", 1, at=later),
        record("e2", 2, at=T0, payload={"agent_version": "2.0.0", "health": "degraded"}),
    )
    delta = plan_batch(batch, known()).environments[("c1", "e1")]
    assert delta.last_heartbeat_at == later
    assert (delta.agent_version, delta.health) == ("2.0.0", "degraded")


def result(command_id: int, outcome: str = "succeeded") -> dict[str, Any]:
    return {"command_id": command_id, "epoch": 1, "outcome": outcome, "message": "done"}


def test_command_result_settles_a_pending_command_once() -> None:
    commands = {7: CommandRow("c1", "e1", "pending")}
    batch = decoded_batch(
        record("r1", 1, kind="command_result", payload=result(7)),
        record("r2", 2, kind="command_result", payload=result(7, "failed")),
    )
    plan = plan_batch(batch, known(commands=commands))
    assert [o.status for o in plan.outcomes] == ["applied", "rejected"]
    assert [(u.command_id, u.status) for u in plan.command_updates] == [(7, "succeeded")]


@pytest.mark.parametrize(
    "row",
    [None, CommandRow("c2", "e1", "pending"), CommandRow("c1", "other", "pending")],
    ids=["missing", "other-customer", "other-environment"],
)
def test_command_result_for_a_foreign_or_missing_command_is_rejected_alike(
    row: CommandRow | None,
) -> None:
    commands = {} if row is None else {7: row}
    batch = decoded_batch(record("r1", 1, kind="command_result", payload=result(7)))
    plan = plan_batch(batch, known(commands=commands))
    assert plan.outcomes[0].status == "rejected"
    assert plan.outcomes[0].reason == "unknown command 7"
    assert plan.command_updates == []


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "undecodable"),
        (b"\xff\x00not json", "undecodable"),
        (b"[1, 2]", "invalid"),
        (record("e1", 1, kind="reboot", payload={}), "unknown_type"),
        (record("e1", -1), "invalid"),
        (record("e1", 1, customer="C1!"), "invalid"),
        ({**record("e1", 1), "extra": 1}, "invalid"),
    ],
)
def test_poison_is_classified(value: dict[str, Any] | bytes | None, reason: str) -> None:
    result = decode(delivered(value))
    assert isinstance(result, Poison)
    assert result.reason == reason
    assert result.detail


def test_key_must_be_the_customer_id() -> None:
    result = decode(delivered(record("e1", 1), key=b"c2"))
    assert isinstance(result, Poison)
    assert "key" in result.detail


# --- identity: one agent id in two environments -------------------------------------

PROD = ("c1", "prod", "a1")
STAGING = ("c1", "staging", "a1")
OBSERVED = {"resources": [{"name": "web", "kind": "deployment", "version": "1.0.0"}]}


def test_one_agent_id_in_two_environments_is_two_agents() -> None:
    batch = decoded_batch(
        record("p1", 1, env="prod", boot="boot-p"),
        record("s1", 1, env="staging", boot="boot-s"),
        record("p2", 2, env="prod", boot="boot-p"),
        record("s2", 2, env="staging", boot="boot-s"),
    )
    plan = plan_batch(batch, known())
    assert [o.status for o in plan.outcomes] == ["applied"] * 4
    assert (plan.agents[PROD].boot_id, plan.agents[PROD].last_seq) == ("boot-p", 2)
    assert (plan.agents[STAGING].boot_id, plan.agents[STAGING].last_seq) == ("boot-s", 2)
    # One first boot each; no flip between them counts as a new boot.
    assert plan.resync_requests == ["new_boot", "new_boot"]
    assert plan.agents[PROD].previous_boots == ()
    assert plan.agents[STAGING].previous_boots == ()


def test_same_event_id_in_two_environments_is_not_a_duplicate() -> None:
    recorded = {("c1", "prod", "a1", "ev-1")}
    batch = decoded_batch(
        record("ev-1", 1, env="prod"),  # a redelivery: the prod agent's own event
        record("ev-1", 1, env="staging"),
        record("ev-2", 2, env="staging"),
        record("ev-2", 2, env="prod"),
    )
    plan = plan_batch(batch, known(recorded=recorded))
    assert plan.duplicates == 1
    assert [
        (o.decoded.record.environment_id, o.decoded.record.event.id) for o in plan.outcomes
    ] == [
        ("staging", "ev-1"),
        ("staging", "ev-2"),
        ("prod", "ev-2"),
    ]
    assert {o.status for o in plan.outcomes} == {"applied"}


def test_one_agents_sequence_never_makes_the_others_stale() -> None:
    # Even with the same boot id (the agents chose it alike), sequence is per identity.
    agents = {PROD: AgentState("boot-1", 50, T0)}
    plan = plan_batch(decoded_batch(record("s1", 3, env="staging")), known(agents=agents))
    assert plan.outcomes[0].status == "applied"
    assert (plan.agents[STAGING].boot_id, plan.agents[STAGING].last_seq) == ("boot-1", 3)
    assert PROD not in plan.agents


def test_command_result_of_the_other_environments_command_is_rejected() -> None:
    commands = {7: CommandRow("c1", "prod", "pending"), 8: CommandRow("c1", "staging", "pending")}
    batch = decoded_batch(
        record("r1", 1, env="staging", kind="command_result", payload=result(7)),
        record("r2", 2, env="staging", kind="command_result", payload=result(8)),
    )
    plan = plan_batch(batch, known(commands=commands))
    assert [o.status for o in plan.outcomes] == ["rejected", "applied"]
    assert [u.command_id for u in plan.command_updates] == [8]


# --- late events of a previous boot --------------------------------------------------


def test_new_boot_remembers_the_boot_it_left() -> None:
    agents = {A1: AgentState("boot-1", 9, T0, previous_boots=("boot-0",))}
    plan = plan_batch(decoded_batch(record("x", 1, boot="boot-2")), known(agents=agents))
    assert plan.agents[A1].previous_boots == ("boot-1", "boot-0")


def test_late_heartbeat_of_a_previous_boot_changes_nothing() -> None:
    later = T0 + timedelta(minutes=1)
    agents = {A1: AgentState("boot-2", 4, T0, previous_boots=("boot-1",))}
    batch = decoded_batch(record("late", 7, boot="boot-1", at=later))
    plan = plan_batch(batch, known(agents=agents))
    assert plan.outcomes[0].status == "rejected"
    assert plan.outcomes[0].reason == "late event of previous boot boot-1: agent is at boot boot-2"
    assert plan.agents == {}
    assert plan.environments == {}
    assert plan.resync_requests == []


def test_late_event_within_one_batch_does_not_move_the_agent_back() -> None:
    batch = decoded_batch(
        record("a1", 1, boot="boot-1"),
        record("b1", 1, boot="boot-2"),
        record("a2", 2, boot="boot-1", kind="observed_state", payload=OBSERVED),
        record("b2", 2, boot="boot-2"),
    )
    plan = plan_batch(batch, known())
    assert [o.status for o in plan.outcomes] == ["applied", "applied", "rejected", "applied"]
    state = plan.agents[A1]
    assert (state.boot_id, state.last_seq, state.previous_boots) == ("boot-2", 2, ("boot-1",))
    # The late report neither counts nor satisfies the new boot's resync request.
    assert state.resync_reason == "new_boot"
    assert plan.environments[("c1", "e1")].observed_reports == 0
    assert plan.reconcile == set()


def test_late_command_result_still_settles_its_command() -> None:
    commands = {7: CommandRow("c1", "e1", "pending")}
    agents = {A1: AgentState("boot-2", 4, T0, previous_boots=("boot-1",))}
    batch = decoded_batch(
        record("late", 9, boot="boot-1", kind="command_result", payload=result(7, "failed"))
    )
    plan = plan_batch(batch, known(agents=agents, commands=commands))
    assert plan.outcomes[0].status == "applied"
    assert [(u.command_id, u.status) for u in plan.command_updates] == [(7, "failed")]
    assert plan.agents == {}  # still at boot-2, seq 4


def test_remembered_boots_are_bounded_newest_first() -> None:
    boots = [f"boot-{n}" for n in range(PREVIOUS_BOOTS_KEPT + 5)]
    plan = plan_batch(decoded_batch(*(record(b, 1, boot=b) for b in boots)), known())
    state = plan.agents[A1]
    assert state.boot_id == boots[-1]
    assert state.previous_boots == tuple(reversed(boots[-PREVIOUS_BOOTS_KEPT - 1 : -1]))
    # A boot beyond the bound is taken for a new one: applied, with a resync request.
    forgotten = plan_batch(
        decoded_batch(record("again", 2, boot=boots[0])), known(agents={A1: state})
    )
    assert forgotten.outcomes[0].status == "applied"
    assert forgotten.agents[A1].boot_id == boots[0]
    assert forgotten.resync_requests == ["new_boot"]


# --- desired state and reconciliation ----------------------------------------------


def change(change_id: str, revision: int, resources: list[dict[str, str]]) -> DecodedChange:
    value = {
        "schema_version": 1,
        "kind": "desired_state",
        "change_id": change_id,
        "customer_id": "c1",
        "environment_id": "e1",
        "operator": "key-1",
        "accepted_at": T0.isoformat(),
        "desired": {"revision": revision, "resources": resources},
    }
    result = decode(delivered(value))
    assert isinstance(result, DecodedChange), result
    return result


WEB_2 = {"kind": "deployment", "name": "web", "version": "2.0.0"}


def test_desired_change_is_applied_once_and_audited() -> None:
    plan = plan_batch([change("ch-1", 1, [WEB_2]), change("ch-1", 1, [WEB_2])], known())
    assert [a.outcome for a in plan.audits] == ["applied"]
    assert plan.duplicates == 1
    assert plan.desired[("c1", "e1")].desired.revision == 1
    assert plan.reconcile == {("c1", "e1")}


def test_stale_or_replayed_revision_is_audited_as_ignored() -> None:
    already = KnownState(frozenset(), {}, {}, frozenset({"ch-0"}), {("c1", "e1"): 3})
    plan = plan_batch([change("ch-0", 9, [WEB_2]), change("ch-1", 3, [])], already)
    assert plan.duplicates == 1
    assert [(a.outcome, a.reason) for a in plan.audits] == [
        ("ignored", "revision 3 is not above 3")
    ]
    assert plan.desired == {}


def test_reconcile_creates_updates_and_deletes() -> None:
    desired = [WEB_2, {"kind": "job", "name": "new", "version": "1.0.0"}]
    observed = [
        {"kind": "deployment", "name": "web", "version": "1.0.0"},
        {"kind": "job", "name": "old", "version": "1.0.0"},
    ]
    result = reconcile(desired, observed, [])
    assert [(c.action, c.name, c.version) for c in result.create] == [
        ("update", "web", "2.0.0"),
        ("create", "new", "1.0.0"),
        ("delete", "old", None),
    ]
    assert not result.converged


def test_reconcile_keeps_matching_pending_commands_and_supersedes_others() -> None:
    pending = [
        PendingCommand(1, "update", "deployment", "web", "2.0.0"),
        PendingCommand(2, "create", "job", "gone", "1.0.0"),
    ]
    result = reconcile(
        [WEB_2], [{"kind": "deployment", "name": "web", "version": "1.0.0"}], pending
    )
    assert result.create == []
    assert result.supersede == [2]


def test_reconcile_replaces_a_pending_command_for_an_older_target() -> None:
    pending = [PendingCommand(1, "update", "deployment", "web", "1.5.0")]
    result = reconcile(
        [WEB_2], [{"kind": "deployment", "name": "web", "version": "1.0.0"}], pending
    )
    assert [(c.action, c.version) for c in result.create] == [("update", "2.0.0")]
    assert result.supersede == [1]


def test_reconcile_converged_when_observed_matches() -> None:
    result = reconcile([WEB_2], [{**WEB_2, "status": "running"}], [])
    assert result.converged
    assert result.create == []

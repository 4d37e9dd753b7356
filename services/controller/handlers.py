"""Turning a partition's records into effects: the controller's domain logic.

Plain functions and data, no faust and no database: ``decode`` sorts records into
valid ones and poison, ``plan_batch`` decides, in partition order, what each event
does to the fleet state given what PostgreSQL already holds. ``store.py`` writes
the plan; ``applier.py`` ties the two together under the ownership fence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from services.shared.events import (
    AgentEventRecord,
    CommandResultEvent,
    DesiredStateRecord,
    HeartbeatEvent,
    ObservedStateEvent,
    TopicRecord,
    decode_topic_record,
)

AgentKey = tuple[str, str, str]
"""(customer id, environment id, agent id): an agent's whole identity.

Enrollment names an agent within its environment, so one agent id may exist in
several environments of a customer; they are different agents.
"""
EnvironmentKey = tuple[str, str]
"""(customer id, environment id)"""
EventKey = tuple[str, str, str, str]
"""(customer id, environment id, agent id, event id): the deduplication key."""

PREVIOUS_BOOTS_KEPT = 16
"""How many of an agent's earlier boot ids are remembered, newest first.

An event of a remembered boot is late and does not move the agent back to it; one
of a boot older than that is taken for a new boot (a resync is requested, nothing
is lost)."""

Status = Literal["applied", "rejected"]


@dataclass(frozen=True, slots=True)
class Delivered:
    """One record as consumed from the events topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_s: float | None = None
    """When Kafka appended the record (its log-append or create time), in epoch seconds."""


@dataclass(frozen=True, slots=True)
class Poison:
    """A record that can never be applied; it goes to the dead-letter topic."""

    delivered: Delivered
    reason: Literal["undecodable", "unknown_type", "invalid", "database_refused", "apply_error"]
    """Why: the first three from decoding; ``database_refused`` when PostgreSQL refused
    the record's values, ``apply_error`` when planning or writing it raised."""
    detail: str
    sqlstate: str | None = None
    """PostgreSQL's error code, for ``database_refused``."""


@dataclass(frozen=True, slots=True)
class Decoded:
    delivered: Delivered
    record: AgentEventRecord

    @property
    def agent_key(self) -> AgentKey:
        r = self.record
        return (r.customer_id, r.environment_id, r.agent_id)

    @property
    def event_key(self) -> EventKey:
        r = self.record
        return (r.customer_id, r.environment_id, r.agent_id, r.event.id)


@dataclass(frozen=True, slots=True)
class DecodedChange:
    """An operator's desired-state change, as consumed."""

    delivered: Delivered
    record: DesiredStateRecord


def decode(delivered: Delivered) -> Decoded | DecodedChange | Poison:
    """Validate one record against the topic contract; never raises."""
    if delivered.value is None:
        return Poison(delivered, "undecodable", "record has no value")
    try:
        record = decode_topic_record(delivered.value)
    except ValidationError as e:
        kinds = {error["type"] for error in e.errors()}
        if "json_invalid" in kinds or "json_type" in kinds:
            return Poison(delivered, "undecodable", "value is not a JSON object")
        if "union_tag_invalid" in kinds:
            return Poison(delivered, "unknown_type", _summarise(e))
        return Poison(delivered, "invalid", _summarise(e))
    if delivered.key is not None and delivered.key != record.customer_id.encode():
        # The key decides the partition and so the owner; a mismatch would let
        # two controllers write one customer.
        return Poison(delivered, "invalid", "record key is not the record's customer id")
    return _wrap(delivered, record)


def _wrap(delivered: Delivered, record: TopicRecord) -> Decoded | DecodedChange:
    if isinstance(record, DesiredStateRecord):
        return DecodedChange(delivered, record)
    return Decoded(delivered, record)


def _summarise(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        location = ".".join(str(p) for p in item["loc"])
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)


@dataclass(slots=True)
class AgentState:
    """An agent's sequencing state: which boot, which sequence number last applied."""

    boot_id: str
    last_seq: int
    last_event_at: datetime
    last_heartbeat_at: datetime | None = None
    resync_requested_at: datetime | None = None
    resync_reason: str | None = None
    previous_boots: tuple[str, ...] = ()
    """Boot ids the agent has left, newest first, at most PREVIOUS_BOOTS_KEPT."""


@dataclass(frozen=True, slots=True)
class CommandRow:
    customer_id: str
    environment_id: str
    status: str


@dataclass(slots=True)
class EnvironmentDelta:
    """What one batch changes in one environment, merged in partition order."""

    last_heartbeat_at: datetime | None = None
    agent_version: str | None = None
    health: str | None = None
    observed_state: list[dict[str, Any]] | None = None
    observed_reports: int = 0
    observed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    decoded: Decoded
    status: Status
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class CommandUpdate:
    command_id: int
    status: Literal["succeeded", "failed"]
    message: str


@dataclass(frozen=True, slots=True)
class Audit:
    """The audit record of one operator change, and what became of it."""

    change: DecodedChange
    outcome: Literal["applied", "ignored"]
    reason: str | None = None


@dataclass(slots=True)
class Plan:
    audits: list[Audit] = field(default_factory=list)
    desired: dict[EnvironmentKey, DesiredStateRecord] = field(default_factory=dict)
    """The newest accepted desired state per environment."""
    reconcile: set[EnvironmentKey] = field(default_factory=set)
    """Environments whose desired or observed state changed: compute their commands."""
    outcomes: list[Outcome] = field(default_factory=list)
    agents: dict[AgentKey, AgentState] = field(default_factory=dict)
    environments: dict[EnvironmentKey, EnvironmentDelta] = field(default_factory=dict)
    command_updates: list[CommandUpdate] = field(default_factory=list)
    duplicates: int = 0
    resync_requests: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class KnownState:
    """What PostgreSQL holds about the records of one batch, loaded before planning."""

    recorded_events: frozenset[EventKey]
    agents: Mapping[AgentKey, AgentState]
    commands: Mapping[int, CommandRow]
    recorded_changes: frozenset[str] = frozenset()
    desired_revisions: Mapping[EnvironmentKey, int] = field(default_factory=dict)


def plan_batch(batch: Sequence[Decoded | DecodedChange], known: KnownState) -> Plan:
    """Decide every event's outcome and effects, in partition order.

    Agents are keyed by their whole identity (customer, environment, agent), and
    events are deduplicated on it plus the event id. Sequencing is per agent boot:
    the next sequence number applies; a higher one applies and requests a
    full-state resync (a gap); a lower or equal one is rejected as stale; a boot id
    not seen before is a new boot and requests a resync. An event of a boot the
    agent has already left is late: it does not move the agent back to that boot
    (see ``_late_event`` for what it still does). An observed-state report is the
    full state, so it satisfies any pending resync.
    """
    plan = Plan()
    agents = {key: replace(state) for key, state in known.agents.items()}
    seen: set[EventKey] = set(known.recorded_events)
    settled_commands: set[int] = set()
    changes_seen: set[str] = set(known.recorded_changes)
    revisions = dict(known.desired_revisions)

    for decoded in batch:
        if isinstance(decoded, DecodedChange):
            _plan_change(decoded, plan, changes_seen, revisions)
            continue
        if decoded.event_key in seen:
            plan.duplicates += 1
            continue
        seen.add(decoded.event_key)
        record = decoded.record
        event = record.event
        agent_key = decoded.agent_key
        state = agents.get(agent_key)

        if state is not None and event.boot_id in state.previous_boots:
            plan.outcomes.append(_late_event(decoded, state, plan, known, settled_commands))
            continue

        resync: str | None = None
        if state is None or state.boot_id != event.boot_id:
            resync = "new_boot"
        elif event.seq <= state.last_seq:
            plan.outcomes.append(
                Outcome(
                    decoded,
                    "rejected",
                    f"stale sequence {event.seq}: boot {event.boot_id} already at {state.last_seq}",
                )
            )
            continue
        elif event.seq > state.last_seq + 1:
            resync = "sequence_gap"

        if state is None:
            state = AgentState(event.boot_id, event.seq, record.accepted_at)
            agents[agent_key] = state
        elif state.boot_id != event.boot_id:
            state.previous_boots = (state.boot_id, *state.previous_boots)[:PREVIOUS_BOOTS_KEPT]
        state.boot_id = event.boot_id
        state.last_seq = event.seq
        state.last_event_at = record.accepted_at
        plan.agents[agent_key] = state

        outcome = _apply_event(decoded, state, plan, known, settled_commands)
        plan.outcomes.append(outcome)

        if isinstance(event, ObservedStateEvent) and outcome.status == "applied":
            state.resync_requested_at = None
            state.resync_reason = None
        elif resync is not None:
            state.resync_requested_at = record.accepted_at
            state.resync_reason = resync
            plan.resync_requests.append(resync)
    return plan


def _late_event(
    decoded: Decoded,
    state: AgentState,
    plan: Plan,
    known: KnownState,
    settled_commands: set[int],
) -> Outcome:
    """An event of a boot the agent has left, delivered after the agent's newer boot.

    The agent's boot, sequence, times and resync request stay as they are. A command
    result is still a fact about a command the agent ran, so it settles its command
    like any other (once, and only a pending command of its own environment). A
    heartbeat or an observed-state report describes a process that has since been
    replaced: it would overwrite newer health, version or observed state and make a
    gone process look alive, so it is recorded as rejected, with the reason.
    """
    event = decoded.record.event
    if isinstance(event, CommandResultEvent):
        return _command_result(decoded, event, plan, known, settled_commands)
    return Outcome(
        decoded,
        "rejected",
        f"late event of previous boot {event.boot_id}: agent is at boot {state.boot_id}",
    )


def _plan_change(
    change: DecodedChange, plan: Plan, changes_seen: set[str], revisions: dict[EnvironmentKey, int]
) -> None:
    record = change.record
    if record.change_id in changes_seen:
        plan.duplicates += 1
        return
    changes_seen.add(record.change_id)
    env_key = (record.customer_id, record.environment_id)
    current = revisions.get(env_key, 0)
    if record.desired.revision <= current:
        plan.audits.append(
            Audit(change, "ignored", f"revision {record.desired.revision} is not above {current}")
        )
        return
    revisions[env_key] = record.desired.revision
    plan.desired[env_key] = record
    plan.reconcile.add(env_key)
    plan.audits.append(Audit(change, "applied"))


def _apply_event(
    decoded: Decoded,
    state: AgentState,
    plan: Plan,
    known: KnownState,
    settled_commands: set[int],
) -> Outcome:
    record = decoded.record
    event = record.event
    env_key = (record.customer_id, record.environment_id)
    if isinstance(event, HeartbeatEvent):
        delta = plan.environments.setdefault(env_key, EnvironmentDelta())
        delta.last_heartbeat_at = _latest(delta.last_heartbeat_at, record.accepted_at)
        delta.agent_version = event.payload.agent_version
        delta.health = event.payload.health
        state.last_heartbeat_at = _latest(state.last_heartbeat_at, record.accepted_at)
        return Outcome(decoded, "applied")
    if isinstance(event, ObservedStateEvent):
        delta = plan.environments.setdefault(env_key, EnvironmentDelta())
        delta.observed_state = [r.model_dump() for r in event.payload.resources]
        delta.observed_reports += 1
        delta.observed_at = record.accepted_at
        plan.reconcile.add(env_key)
        return Outcome(decoded, "applied")
    if isinstance(event, CommandResultEvent):
        return _command_result(decoded, event, plan, known, settled_commands)
    raise AssertionError(f"unhandled event type {event!r}")  # pragma: no cover


def _command_result(
    decoded: Decoded,
    event: CommandResultEvent,
    plan: Plan,
    known: KnownState,
    settled_commands: set[int],
) -> Outcome:
    record = decoded.record
    command_id = event.payload.command_id
    command = known.commands.get(command_id)
    if command is None or (command.customer_id, command.environment_id) != (
        record.customer_id,
        record.environment_id,
    ):
        # Same answer for "no such command" and "another environment's command":
        # an agent learns nothing about commands it does not own.
        return Outcome(decoded, "rejected", f"unknown command {command_id}")
    if command.status != "pending" or command_id in settled_commands:
        return Outcome(decoded, "rejected", f"command {command_id} is already {command.status}")
    settled_commands.add(command_id)
    plan.command_updates.append(
        CommandUpdate(command_id, event.payload.outcome, event.payload.message)
    )
    return Outcome(decoded, "applied")


def _latest(current: datetime | None, candidate: datetime) -> datetime:
    return candidate if current is None or candidate > current else current


def command_ids(batch: Iterable[Decoded | DecodedChange]) -> set[int]:
    return {
        d.record.event.payload.command_id
        for d in batch
        if isinstance(d, Decoded) and isinstance(d.record.event, CommandResultEvent)
    }


# --- Reconciliation ---------------------------------------------------------------

ResourceKey = tuple[str, str]
"""(kind, name)"""


@dataclass(frozen=True, slots=True)
class PendingCommand:
    id: int
    action: str
    kind: str
    name: str
    version: str | None


@dataclass(frozen=True, slots=True)
class CommandSpec:
    action: Literal["create", "update", "delete"]
    kind: str
    name: str
    version: str | None


@dataclass(frozen=True, slots=True)
class Reconciliation:
    create: list[CommandSpec]
    supersede: list[int]
    """Pending commands that no longer lead to the desired state."""
    converged: bool
    """The observed state already is the desired state."""


def reconcile(
    desired: Sequence[Mapping[str, Any]],
    observed: Sequence[Mapping[str, Any]],
    pending: Sequence[PendingCommand],
) -> Reconciliation:
    """The commands that move ``observed`` to ``desired``, given those already pending.

    A pending command that still leads where desired stays (no duplicate on
    redelivery or on repeated reports); one that leads elsewhere is superseded.
    """
    want = {(r["kind"], r["name"]): r["version"] for r in desired}
    have = {(r["kind"], r["name"]): r["version"] for r in observed}
    needed: dict[ResourceKey, CommandSpec] = {}
    for key, version in want.items():
        if key not in have:
            needed[key] = CommandSpec("create", key[0], key[1], version)
        elif have[key] != version:
            needed[key] = CommandSpec("update", key[0], key[1], version)
    for key in have.keys() - want.keys():
        needed[key] = CommandSpec("delete", key[0], key[1], None)

    by_resource = {(p.kind, p.name): p for p in pending}
    create: list[CommandSpec] = []
    supersede: list[int] = []
    for key, spec in sorted(needed.items()):
        current = by_resource.get(key)
        if current is not None and (current.action, current.version) == (spec.action, spec.version):
            continue
        if current is not None:
            supersede.append(current.id)
        create.append(spec)
    supersede.extend(p.id for key, p in sorted(by_resource.items()) if key not in needed)
    return Reconciliation(create, supersede, converged=not needed)

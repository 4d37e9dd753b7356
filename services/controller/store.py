"""SQL for the apply transaction: load what a batch needs, write its plan, fence it.

Every statement runs inside the caller's transaction, which ends with the
ownership fence (``ownership.advance_all_fenced``); nothing here commits.
``apply_batch`` is the whole transaction's body: the controller runs it, and so
does the ceiling bench's database-only loop, so both issue the same SQL.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    DateTime,
    Executable,
    Integer,
    Interval,
    Text,
    bindparam,
    case,
    cast,
    column,
    func,
    literal,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.controller.handlers import (
    AgentKey,
    AgentState,
    CommandRow,
    Decoded,
    DecodedChange,
    EnvironmentKey,
    EventKey,
    KnownState,
    PendingCommand,
    Plan,
    command_ids,
    plan_batch,
    reconcile,
)
from services.controller.ownership import Claim, advance_all_fenced
from services.shared.channels import COMMANDS_CHANNEL
from services.shared.schema import (
    agent_status,
    commands,
    environments,
    event_records,
    operator_audit,
)


def _key_rows(keys: Sequence[tuple[str, ...]], *names: str) -> Any:
    """The keys as a derived table, one text array per column, joined on an index.

    A row-constructor IN list of a few hundred keys is planned as a scan of the
    whole table; ``unnest`` of arrays joins through the primary key instead.
    """
    columns = [list(column) for column in zip(*keys, strict=True)]
    return (
        func.unnest(*(literal(column, ARRAY(Text)) for column in columns))
        .table_valued(*names)
        .render_derived()
    )


async def load_known_state(
    conn: AsyncConnection, batch: Sequence[Decoded | DecodedChange]
) -> KnownState:
    events = [d for d in batch if isinstance(d, Decoded)]
    changes = [d for d in batch if isinstance(d, DecodedChange)]
    event_keys = list({d.event_key for d in events})
    agent_keys = list({d.agent_key for d in events})
    recorded: frozenset[EventKey] = frozenset()
    if event_keys:
        keys = _key_rows(event_keys, "customer_id", "environment_id", "agent_id", "event_id")
        rows = await conn.execute(
            select(
                event_records.c.customer_id,
                event_records.c.environment_id,
                event_records.c.agent_id,
                event_records.c.event_id,
            ).join_from(
                keys,
                event_records,
                (event_records.c.customer_id == keys.c.customer_id)
                & (event_records.c.environment_id == keys.c.environment_id)
                & (event_records.c.agent_id == keys.c.agent_id)
                & (event_records.c.event_id == keys.c.event_id),
            )
        )
        recorded = frozenset(
            (r.customer_id, r.environment_id, r.agent_id, r.event_id) for r in rows
        )
    agents: dict[AgentKey, AgentState] = {}
    if agent_keys:
        keys = _key_rows(agent_keys, "customer_id", "environment_id", "agent_id")
        rows = await conn.execute(
            select(agent_status).join_from(
                keys,
                agent_status,
                (agent_status.c.customer_id == keys.c.customer_id)
                & (agent_status.c.environment_id == keys.c.environment_id)
                & (agent_status.c.agent_id == keys.c.agent_id),
            )
        )
        for r in rows:
            agents[(r.customer_id, r.environment_id, r.agent_id)] = AgentState(
                boot_id=r.boot_id,
                last_seq=r.last_seq,
                last_event_at=r.last_event_at,
                last_heartbeat_at=r.last_heartbeat_at,
                resync_requested_at=r.resync_requested_at,
                resync_reason=r.resync_reason,
                previous_boots=tuple(r.previous_boots),
            )
    known_commands: dict[int, CommandRow] = {}
    wanted = command_ids(batch)
    if wanted:
        rows = await conn.execute(
            select(
                commands.c.id, commands.c.customer_id, commands.c.environment_id, commands.c.status
            ).where(commands.c.id.in_(wanted))
        )
        known_commands = {r.id: CommandRow(r.customer_id, r.environment_id, r.status) for r in rows}
    recorded_changes: frozenset[str] = frozenset()
    revisions: dict[tuple[str, str], int] = {}
    if changes:
        rows = await conn.execute(
            select(operator_audit.c.change_id).where(
                operator_audit.c.change_id.in_({c.record.change_id for c in changes})
            )
        )
        recorded_changes = frozenset(r.change_id for r in rows)
        env_keys = list({(c.record.customer_id, c.record.environment_id) for c in changes})
        rows = await conn.execute(
            select(
                environments.c.customer_id,
                environments.c.environment_id,
                environments.c.desired_revision,
            ).where(tuple_(environments.c.customer_id, environments.c.environment_id).in_(env_keys))
        )
        revisions = {(r.customer_id, r.environment_id): r.desired_revision for r in rows}
    return KnownState(recorded, agents, known_commands, recorded_changes, revisions)


@dataclass(frozen=True, slots=True)
class BatchOwner:
    """Which partition, under which epoch, a record of the batch was applied in."""

    partition: int
    epoch: int


def _unnest(*columns: tuple[str, Any]) -> Any:
    """``unnest(:a, :b, …) AS u(a, b, …)``: one bound array per column, rows by position.

    A whole batch's rows in one statement with a constant text (so psycopg prepares
    it once per connection), instead of an executemany that SQLAlchemy's psycopg
    dialect sends as one statement per row. The arrays are bound as ``in_<column>``
    (see ``_bound``): SQLAlchemy reserves a column's own name in an UPDATE.
    """
    return (
        func.unnest(*(bindparam(f"in_{name}", type_=ARRAY(type_)) for name, type_ in columns))
        .table_valued(*(column(name, type_) for name, type_ in columns))
        .render_derived(name="u")
    )


def _bound(arrays: Mapping[str, list[Any]]) -> dict[str, Any]:
    """The parameters of an ``_unnest``: each column's array under its bound name."""
    return {f"in_{name}": values for name, values in arrays.items()}


def text_array_literal(values: Sequence[str]) -> str:
    """``values`` as PostgreSQL's text form of a ``text[]``, every element quoted.

    An array-valued column cannot travel inside ``unnest`` (a two-dimensional array
    unnests to its elements), so it travels as its text form and is cast back.
    """
    quoted = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return "{" + ",".join(quoted) + "}"


_AUDIT_ROWS = _unnest(
    ("change_id", Text),
    ("customer_id", Text),
    ("environment_id", Text),
    ("operator", Text),
    ("revision", BigInteger),
    ("outcome", Text),
    ("reason", Text),
    ("request_id", Text),
    ("accepted_at", DateTime(timezone=True)),
)
INSERT_AUDITS: Final = (
    insert(operator_audit)
    .from_select(
        [
            "change_id",
            "customer_id",
            "environment_id",
            "operator",
            "action",
            "revision",
            "outcome",
            "reason",
            "request_id",
            "accepted_at",
        ],
        select(
            _AUDIT_ROWS.c.change_id,
            _AUDIT_ROWS.c.customer_id,
            _AUDIT_ROWS.c.environment_id,
            _AUDIT_ROWS.c.operator,
            literal("set_desired_state", Text),
            _AUDIT_ROWS.c.revision,
            _AUDIT_ROWS.c.outcome,
            _AUDIT_ROWS.c.reason,
            _AUDIT_ROWS.c.request_id,
            _AUDIT_ROWS.c.accepted_at,
        ),
    )
    .on_conflict_do_nothing()
)


def _desired_upsert() -> Any:
    rows = _unnest(
        ("customer_id", Text),
        ("environment_id", Text),
        ("desired_state", Text),
        ("desired_revision", BigInteger),
    )
    statement = insert(environments).from_select(
        ["customer_id", "environment_id", "desired_state", "desired_revision"],
        select(
            rows.c.customer_id,
            rows.c.environment_id,
            cast(rows.c.desired_state, JSONB),
            rows.c.desired_revision,
        ),
    )
    return statement.on_conflict_do_update(
        index_elements=["customer_id", "environment_id"],
        set_={
            "desired_state": statement.excluded.desired_state,
            "desired_revision": statement.excluded.desired_revision,
            "updated_at": func.now(),
        },
    )


UPSERT_DESIRED: Final = _desired_upsert()

_EVENT_COLUMNS: Final = (
    ("customer_id", Text),
    ("agent_id", Text),
    ("event_id", Text),
    ("environment_id", Text),
    ("event_type", Text),
    ("boot_id", Text),
    ("seq", BigInteger),
    ("status", Text),
    ("reason", Text),
    ("partition", Integer),
    ("offset", BigInteger),
    ("epoch", BigInteger),
    ("accepted_at", DateTime(timezone=True)),
)
_EVENT_ROWS = _unnest(*_EVENT_COLUMNS)
INSERT_EVENTS: Final = (
    insert(event_records)
    .from_select(
        [name for name, _ in _EVENT_COLUMNS],
        select(*(_EVENT_ROWS.c[name] for name, _ in _EVENT_COLUMNS)),
    )
    .on_conflict_do_nothing()
)

_AGENT_UPDATED = (
    "boot_id",
    "last_seq",
    "last_event_at",
    "last_heartbeat_at",
    "resync_requested_at",
    "resync_reason",
    "previous_boots",
)


def _agent_upsert() -> Any:
    rows = _unnest(
        ("customer_id", Text),
        ("environment_id", Text),
        ("agent_id", Text),
        ("boot_id", Text),
        ("last_seq", BigInteger),
        ("last_event_at", DateTime(timezone=True)),
        ("last_heartbeat_at", DateTime(timezone=True)),
        ("resync_requested_at", DateTime(timezone=True)),
        ("resync_reason", Text),
        ("previous_boots", Text),
    )
    statement = insert(agent_status).from_select(
        ["customer_id", "environment_id", "agent_id", *_AGENT_UPDATED],
        select(
            rows.c.customer_id,
            rows.c.environment_id,
            rows.c.agent_id,
            rows.c.boot_id,
            rows.c.last_seq,
            rows.c.last_event_at,
            rows.c.last_heartbeat_at,
            rows.c.resync_requested_at,
            rows.c.resync_reason,
            cast(rows.c.previous_boots, ARRAY(Text)),
        ),
    )
    return statement.on_conflict_do_update(
        index_elements=["customer_id", "environment_id", "agent_id"],
        set_={name: statement.excluded[name] for name in _AGENT_UPDATED},
    )


UPSERT_AGENTS: Final = _agent_upsert()


def _environment_upsert() -> Any:
    rows = _unnest(
        ("customer_id", Text),
        ("environment_id", Text),
        ("last_heartbeat_at", DateTime(timezone=True)),
        ("agent_version", Text),
        ("health", Text),
        ("observed_state", Text),
        ("observed_reports", BigInteger),
        ("observed_at", DateTime(timezone=True)),
    )
    statement = insert(environments).from_select(
        [
            "customer_id",
            "environment_id",
            "last_heartbeat_at",
            "agent_version",
            "health",
            "observed_state",
            "observed_reports",
            "observed_at",
        ],
        select(
            rows.c.customer_id,
            rows.c.environment_id,
            rows.c.last_heartbeat_at,
            rows.c.agent_version,
            rows.c.health,
            cast(rows.c.observed_state, JSONB),
            rows.c.observed_reports,
            rows.c.observed_at,
        ),
    )
    current, new = environments.c, statement.excluded
    return statement.on_conflict_do_update(
        index_elements=["customer_id", "environment_id"],
        set_={
            # GREATEST ignores NULLs in PostgreSQL, so a batch without heartbeats
            # keeps the stored time.
            "last_heartbeat_at": func.greatest(current.last_heartbeat_at, new.last_heartbeat_at),
            "agent_version": func.coalesce(new.agent_version, current.agent_version),
            "health": func.coalesce(new.health, current.health),
            "observed_state": case(
                (new.observed_at.is_(None), current.observed_state), else_=new.observed_state
            ),
            # Added, not set: each report of the batch counts once, whatever else
            # the batch held for the environment.
            "observed_reports": current.observed_reports + new.observed_reports,
            "observed_at": func.coalesce(new.observed_at, current.observed_at),
            "updated_at": func.now(),
        },
    )


UPSERT_ENVIRONMENTS: Final = _environment_upsert()


def _command_results() -> Any:
    rows = _unnest(("id", BigInteger), ("status", Text), ("message", Text))
    return (
        update(commands)
        .values(status=rows.c.status, result_message=rows.c.message, updated_at=func.now())
        .where(commands.c.id == rows.c.id, commands.c.status == "pending")
    )


SETTLE_COMMANDS: Final = _command_results()


def _columns(rows: Sequence[dict[str, Any]], names: Iterable[str]) -> dict[str, list[Any]]:
    return {name: [row[name] for row in rows] for name in names}


def plan_statements(
    plan: Plan, owners: Mapping[int, int]
) -> list[tuple[Executable, dict[str, Any]]]:
    """The statements that write ``plan``, one per table, each with its bound arrays.

    ``owners`` maps each partition of the batch to the epoch it is applied under
    (stamped on every event record). At most six statements, whatever the number
    of partitions and records. Exposed so that the ceiling bench runs the same SQL.
    """
    statements: list[tuple[Executable, dict[str, Any]]] = []
    if plan.audits:
        statements.append(
            (
                INSERT_AUDITS,
                _bound(
                    {
                        "change_id": [a.change.record.change_id for a in plan.audits],
                        "customer_id": [a.change.record.customer_id for a in plan.audits],
                        "environment_id": [a.change.record.environment_id for a in plan.audits],
                        "operator": [a.change.record.operator for a in plan.audits],
                        "revision": [a.change.record.desired.revision for a in plan.audits],
                        "outcome": [a.outcome for a in plan.audits],
                        "reason": [a.reason for a in plan.audits],
                        "request_id": [a.change.record.request_id for a in plan.audits],
                        "accepted_at": [a.change.record.accepted_at for a in plan.audits],
                    }
                ),
            )
        )
    if plan.desired:
        desired = sorted(plan.desired.items())
        statements.append(
            (
                UPSERT_DESIRED,
                _bound(
                    {
                        "customer_id": [k[0] for k, _ in desired],
                        "environment_id": [k[1] for k, _ in desired],
                        "desired_state": [
                            json.dumps([r.model_dump() for r in c.desired.resources])
                            for _, c in desired
                        ],
                        "desired_revision": [c.desired.revision for _, c in desired],
                    }
                ),
            )
        )
    if plan.outcomes:
        records = [o.decoded.record for o in plan.outcomes]
        statements.append(
            (
                INSERT_EVENTS,
                _bound(
                    {
                        "customer_id": [r.customer_id for r in records],
                        "agent_id": [r.agent_id for r in records],
                        "event_id": [r.event.id for r in records],
                        "environment_id": [r.environment_id for r in records],
                        "event_type": [r.event.type for r in records],
                        "boot_id": [r.event.boot_id for r in records],
                        "seq": [r.event.seq for r in records],
                        "status": [o.status for o in plan.outcomes],
                        "reason": [o.reason for o in plan.outcomes],
                        "partition": [o.decoded.delivered.partition for o in plan.outcomes],
                        "offset": [o.decoded.delivered.offset for o in plan.outcomes],
                        "epoch": [owners[o.decoded.delivered.partition] for o in plan.outcomes],
                        "accepted_at": [r.accepted_at for r in records],
                    }
                ),
            )
        )
    if plan.agents:
        agents = sorted(plan.agents.items())
        statements.append(
            (
                UPSERT_AGENTS,
                _bound(
                    {
                        "customer_id": [k[0] for k, _ in agents],
                        "environment_id": [k[1] for k, _ in agents],
                        "agent_id": [k[2] for k, _ in agents],
                        "boot_id": [s.boot_id for _, s in agents],
                        "last_seq": [s.last_seq for _, s in agents],
                        "last_event_at": [s.last_event_at for _, s in agents],
                        "last_heartbeat_at": [s.last_heartbeat_at for _, s in agents],
                        "resync_requested_at": [s.resync_requested_at for _, s in agents],
                        "resync_reason": [s.resync_reason for _, s in agents],
                        "previous_boots": [text_array_literal(s.previous_boots) for _, s in agents],
                    }
                ),
            )
        )
    if plan.environments:
        envs = sorted(plan.environments.items())
        statements.append(
            (
                UPSERT_ENVIRONMENTS,
                _bound(
                    {
                        "customer_id": [k[0] for k, _ in envs],
                        "environment_id": [k[1] for k, _ in envs],
                        "last_heartbeat_at": [d.last_heartbeat_at for _, d in envs],
                        "agent_version": [d.agent_version for _, d in envs],
                        "health": [d.health for _, d in envs],
                        "observed_state": [
                            json.dumps(d.observed_state if d.observed_state is not None else [])
                            for _, d in envs
                        ],
                        "observed_reports": [d.observed_reports for _, d in envs],
                        "observed_at": [d.observed_at for _, d in envs],
                    }
                ),
            )
        )
    if plan.command_updates:
        statements.append(
            (
                SETTLE_COMMANDS,
                _bound(
                    {
                        "id": [c.command_id for c in plan.command_updates],
                        "status": [c.status for c in plan.command_updates],
                        "message": [c.message for c in plan.command_updates],
                    }
                ),
            )
        )
    return statements


async def write_plan(conn: AsyncConnection, plan: Plan, owners: Mapping[int, int]) -> None:
    """Write ``plan`` (see ``plan_statements``) in the caller's transaction."""
    for statement, parameters in plan_statements(plan, owners):
        await conn.execute(statement, parameters)


_ENVIRONMENT_KEYS = _unnest(("customer_id", Text), ("environment_id", Text))
_ON_ENVIRONMENT = (environments.c.customer_id == _ENVIRONMENT_KEYS.c.customer_id) & (
    environments.c.environment_id == _ENVIRONMENT_KEYS.c.environment_id
)
LOAD_RECONCILED: Final = select(
    environments.c.customer_id,
    environments.c.environment_id,
    environments.c.desired_state,
    environments.c.desired_revision,
    environments.c.observed_state,
    environments.c.observed_revision,
).join_from(_ENVIRONMENT_KEYS, environments, _ON_ENVIRONMENT)
LOAD_PENDING: Final = select(
    commands.c.id,
    commands.c.customer_id,
    commands.c.environment_id,
    commands.c.action,
    commands.c.resource_kind,
    commands.c.resource_name,
    commands.c.version,
).join_from(
    _ENVIRONMENT_KEYS,
    commands,
    (commands.c.customer_id == _ENVIRONMENT_KEYS.c.customer_id)
    & (commands.c.environment_id == _ENVIRONMENT_KEYS.c.environment_id)
    & (commands.c.status == "pending"),
)
SUPERSEDE: Final = (
    update(commands)
    .where(
        commands.c.id == func.any(bindparam("ids", type_=ARRAY(BigInteger))),
        commands.c.status == "pending",
    )
    .values(status="superseded", updated_at=func.now())
)
_NEW_COMMAND_COLUMNS: Final = (
    ("customer_id", Text),
    ("environment_id", Text),
    ("epoch", BigInteger),
    ("revision", BigInteger),
    ("action", Text),
    ("resource_kind", Text),
    ("resource_name", Text),
    ("version", Text),
    ("partition", Integer),
)
_NEW_COMMANDS = _unnest(*_NEW_COMMAND_COLUMNS)
CREATE_COMMANDS: Final = insert(commands).from_select(
    [name for name, _ in _NEW_COMMAND_COLUMNS] + ["attempts", "not_before", "deadline_at"],
    select(
        *(_NEW_COMMANDS.c[name] for name, _ in _NEW_COMMAND_COLUMNS),
        literal(1, Integer),
        # The database's clock, like not_before's default, so the API compares
        # like with like.
        func.now(),
        func.now() + bindparam("ack_timeout", type_=Interval),
    ),
)
_NOTIFIED = _unnest(("payload", Text))
NOTIFY: Final = select(func.pg_notify(COMMANDS_CHANNEL, _NOTIFIED.c.payload)).select_from(_NOTIFIED)
_CONVERGED = _unnest(("customer_id", Text), ("environment_id", Text), ("revision", BigInteger))
MARK_CONVERGED: Final = (
    update(environments)
    .values(observed_revision=_CONVERGED.c.revision, updated_at=func.now())
    .where(
        environments.c.customer_id == _CONVERGED.c.customer_id,
        environments.c.environment_id == _CONVERGED.c.environment_id,
    )
)


async def reconcile_environments(
    conn: AsyncConnection,
    owners: Mapping[EnvironmentKey, BatchOwner],
    *,
    ack_timeout_s: float,
) -> int:
    """Create the commands that move each environment of ``owners`` to its desired state.

    Stamps new commands with the owner's epoch and the desired revision, supersedes
    pending ones that lead elsewhere, records convergence as observed_revision,
    and notifies long-polling agents (delivered by PostgreSQL at commit). Every
    environment at once: two loads and at most four writes, whatever their number.
    Returns the number of commands created.
    """
    keys = sorted(owners)
    key_arrays = _bound(
        {"customer_id": [k[0] for k in keys], "environment_id": [k[1] for k in keys]}
    )
    envs = {
        (r.customer_id, r.environment_id): r
        for r in await conn.execute(LOAD_RECONCILED, key_arrays)
    }
    pending: dict[EnvironmentKey, list[PendingCommand]] = {}
    for r in await conn.execute(LOAD_PENDING, key_arrays):
        pending.setdefault((r.customer_id, r.environment_id), []).append(
            PendingCommand(r.id, r.action, r.resource_kind, r.resource_name, r.version)
        )
    supersede: list[int] = []
    created: list[dict[str, Any]] = []
    notified: list[str] = []
    converged: list[tuple[str, str, int]] = []
    for key in keys:
        env = envs.get(key)
        if env is None or env.desired_state is None:
            continue  # no desired state set yet: nothing to move towards
        result = reconcile(env.desired_state, env.observed_state, pending.get(key, []))
        supersede += result.supersede
        owner = owners[key]
        for spec in result.create:
            created.append(
                {
                    "customer_id": key[0],
                    "environment_id": key[1],
                    "epoch": owner.epoch,
                    "revision": env.desired_revision,
                    "action": spec.action,
                    "resource_kind": spec.kind,
                    "resource_name": spec.name,
                    "version": spec.version,
                    "partition": owner.partition,
                }
            )
        if result.create:
            notified.append(f"{key[0]}/{key[1]}")
        if result.converged and env.observed_revision != env.desired_revision:
            converged.append((key[0], key[1], env.desired_revision))
    if supersede:
        await conn.execute(SUPERSEDE, {"ids": supersede})
    if created:
        parameters = _bound(_columns(created, (n for n, _ in _NEW_COMMAND_COLUMNS)))
        parameters["ack_timeout"] = timedelta(seconds=ack_timeout_s)
        await conn.execute(CREATE_COMMANDS, parameters)
        await conn.execute(NOTIFY, _bound({"payload": notified}))
    if converged:
        await conn.execute(
            MARK_CONVERGED,
            _bound(
                {
                    "customer_id": [c[0] for c in converged],
                    "environment_id": [c[1] for c in converged],
                    "revision": [c[2] for c in converged],
                }
            ),
        )
    return len(created)


async def expire_commands(
    conn: AsyncConnection,
    *,
    partition: int,
    epoch: int,
    ack_timeout_s: float,
    max_attempts: int,
    max_backoff_s: float,
) -> tuple[int, int]:
    """Re-offer pending commands whose result is overdue, or time them out.

    A re-offered command waits ``min(2**attempts, max_backoff_s)`` seconds before the
    agent sees it again and carries the current owner's epoch, so an agent that has
    seen that epoch does not ignore it. Returns (re-offered, timed out).
    """
    overdue = (
        (commands.c.partition == partition)
        & (commands.c.status == "pending")
        & (commands.c.deadline_at < func.now())
    )
    timed_out = await conn.execute(
        update(commands)
        .where(overdue, commands.c.attempts >= max_attempts)
        .values(
            status="timed_out",
            result_message=f"no result after {max_attempts} offers",
            updated_at=func.now(),
        )
    )
    backoff = func.least(func.power(2, commands.c.attempts), max_backoff_s)
    not_before = func.now() + func.make_interval(0, 0, 0, 0, 0, 0, backoff)
    reoffered = (
        await conn.execute(
            update(commands)
            .where(overdue, commands.c.attempts < max_attempts)
            .values(
                attempts=commands.c.attempts + 1,
                epoch=epoch,
                not_before=not_before,
                deadline_at=not_before + timedelta(seconds=ack_timeout_s),
                updated_at=func.now(),
            )
            .returning(commands.c.customer_id, commands.c.environment_id)
        )
    ).all()
    for customer_id, environment_id in {(r.customer_id, r.environment_id) for r in reoffered}:
        await conn.execute(
            select(func.pg_notify(COMMANDS_CHANNEL, f"{customer_id}/{environment_id}"))
        )
    return len(reoffered), timed_out.rowcount


@dataclass(frozen=True, slots=True)
class PendingFence:
    """One partition of an apply transaction whose effects are written, not yet fenced."""

    partition: int
    epoch: int
    next_offset: int
    event_ids: list[str]
    """Events applied (not skipped as duplicates) by this transaction in the partition."""


@dataclass(frozen=True, slots=True)
class BatchPart:
    """One partition's share of a batch: its records in offset order, under its claim."""

    claim: Claim
    decoded: Sequence[Decoded | DecodedChange]
    next_offset: int
    """The partition's stored offset once this part is applied."""


async def apply_batch(
    conn: AsyncConnection,
    parts: Sequence[BatchPart],
    *,
    ack_timeout_s: float,
    before_fence: Callable[[list[PendingFence]], None] | None = None,
) -> Plan:
    """Apply a batch in the caller's transaction, with a fixed number of statements.

    At most five loads of what PostgreSQL knows (one per kind, every partition at
    once), one write per table (``plan_statements``), the reconciliation of every
    environment whose desired or observed state changed (two loads, at most four
    writes), and one fence over every partition, last. Customers are keyed to
    partitions, so one plan over the parts, each in offset order, decides what a
    plan per partition would. ``before_fence`` observes the transaction with its
    effects written (tests stop the process there).
    """
    ordered = sorted(parts, key=lambda p: p.claim.partition)
    batch = [d for part in ordered for d in part.decoded]
    epochs = {part.claim.partition: part.claim.epoch for part in ordered}
    known = await load_known_state(conn, batch)
    plan = plan_batch(batch, known)
    await write_plan(conn, plan, epochs)
    if plan.reconcile:
        owners: dict[EnvironmentKey, BatchOwner] = {}
        for decoded in batch:
            key = (decoded.record.customer_id, decoded.record.environment_id)
            if key in plan.reconcile:
                partition = decoded.delivered.partition
                owners[key] = BatchOwner(partition, epochs[partition])
        await reconcile_environments(conn, owners, ack_timeout_s=ack_timeout_s)
    if before_fence is not None:
        applied: dict[int, list[str]] = {partition: [] for partition in epochs}
        for outcome in plan.outcomes:
            applied[outcome.decoded.delivered.partition].append(outcome.decoded.record.event.id)
        before_fence(
            [
                PendingFence(
                    part.claim.partition,
                    part.claim.epoch,
                    part.next_offset,
                    applied[part.claim.partition],
                )
                for part in ordered
            ]
        )
    # The fence after every effect: an ownership row is locked only from the fence
    # to the commit, so a controller paused while writing effects holds no
    # ownership row, and a new owner can take the partition over.
    await advance_all_fenced(conn, [(part.claim, part.next_offset) for part in ordered])
    return plan

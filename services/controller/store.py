"""SQL for the apply transaction: load what a batch needs, write its plan.

Every statement runs inside the caller's transaction, which ends with the
ownership fence (``ownership.advance_fenced``); nothing here commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Text, case, func, literal, select, tuple_, update
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.controller.handlers import (
    AgentKey,
    AgentState,
    CommandRow,
    Decoded,
    DecodedChange,
    EventKey,
    KnownState,
    PendingCommand,
    Plan,
    command_ids,
    reconcile,
)
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


async def write_plan(conn: AsyncConnection, plan: Plan, epoch: int) -> None:
    if plan.audits:
        await conn.execute(
            insert(operator_audit).on_conflict_do_nothing(),
            [
                {
                    "change_id": a.change.record.change_id,
                    "customer_id": a.change.record.customer_id,
                    "environment_id": a.change.record.environment_id,
                    "operator": a.change.record.operator,
                    "action": "set_desired_state",
                    "revision": a.change.record.desired.revision,
                    "outcome": a.outcome,
                    "reason": a.reason,
                    "request_id": a.change.record.request_id,
                    "accepted_at": a.change.record.accepted_at,
                }
                for a in plan.audits
            ],
        )
    for (customer_id, environment_id), change in plan.desired.items():
        statement = insert(environments).values(
            customer_id=customer_id,
            environment_id=environment_id,
            desired_state=[r.model_dump() for r in change.desired.resources],
            desired_revision=change.desired.revision,
        )
        await conn.execute(
            statement.on_conflict_do_update(
                index_elements=["customer_id", "environment_id"],
                set_={
                    "desired_state": statement.excluded.desired_state,
                    "desired_revision": statement.excluded.desired_revision,
                    "updated_at": func.now(),
                },
            )
        )
    if plan.outcomes:
        await conn.execute(
            insert(event_records).on_conflict_do_nothing(),
            [
                {
                    "customer_id": o.decoded.record.customer_id,
                    "agent_id": o.decoded.record.agent_id,
                    "event_id": o.decoded.record.event.id,
                    "environment_id": o.decoded.record.environment_id,
                    "event_type": o.decoded.record.event.type,
                    "boot_id": o.decoded.record.event.boot_id,
                    "seq": o.decoded.record.event.seq,
                    "status": o.status,
                    "reason": o.reason,
                    "partition": o.decoded.delivered.partition,
                    "offset": o.decoded.delivered.offset,
                    "epoch": epoch,
                    "accepted_at": o.decoded.record.accepted_at,
                }
                for o in plan.outcomes
            ],
        )
    if plan.agents:
        statement = insert(agent_status)
        await conn.execute(
            statement.on_conflict_do_update(
                index_elements=["customer_id", "environment_id", "agent_id"],
                set_={
                    column: statement.excluded[column]
                    for column in (
                        "boot_id",
                        "last_seq",
                        "last_event_at",
                        "last_heartbeat_at",
                        "resync_requested_at",
                        "resync_reason",
                        "previous_boots",
                    )
                },
            ),
            [
                {
                    "customer_id": customer_id,
                    "environment_id": environment_id,
                    "agent_id": agent_id,
                    "boot_id": s.boot_id,
                    "last_seq": s.last_seq,
                    "last_event_at": s.last_event_at,
                    "last_heartbeat_at": s.last_heartbeat_at,
                    "resync_requested_at": s.resync_requested_at,
                    "resync_reason": s.resync_reason,
                    "previous_boots": list(s.previous_boots),
                }
                for (customer_id, environment_id, agent_id), s in plan.agents.items()
            ],
        )
    if plan.environments:
        await conn.execute(_environment_upsert(), _environment_rows(plan))
    for command in plan.command_updates:
        await conn.execute(
            update(commands)
            .where(commands.c.id == command.command_id, commands.c.status == "pending")
            .values(status=command.status, result_message=command.message, updated_at=func.now())
        )


def _environment_upsert() -> Any:
    statement = insert(environments)
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
            "observed_reports": current.observed_reports + new.observed_reports,
            "observed_at": func.coalesce(new.observed_at, current.observed_at),
            "updated_at": func.now(),
        },
    )


def _environment_rows(plan: Plan) -> list[dict[str, Any]]:
    return [
        {
            "customer_id": customer_id,
            "environment_id": environment_id,
            "last_heartbeat_at": d.last_heartbeat_at,
            "agent_version": d.agent_version,
            "health": d.health,
            "observed_state": d.observed_state if d.observed_state is not None else [],
            "observed_reports": d.observed_reports,
            "observed_at": d.observed_at,
        }
        for (customer_id, environment_id), d in plan.environments.items()
    ]


async def reconcile_environments(
    conn: AsyncConnection,
    env_keys: set[tuple[str, str]],
    *,
    epoch: int,
    partition: int,
    ack_timeout_s: float,
) -> int:
    """Create the commands that move each environment to its desired state.

    Stamps new commands with the owner's epoch and the desired revision, supersedes
    pending ones that lead elsewhere, records convergence as observed_revision,
    and notifies long-polling agents (delivered by PostgreSQL at commit). Returns
    the number of commands created.
    """
    created = 0
    # The database's clock, like not_before's default, so the API compares like with like.
    now = (await conn.execute(select(func.now()))).scalar_one()
    for customer_id, environment_id in sorted(env_keys):
        env = (
            await conn.execute(
                select(
                    environments.c.desired_state,
                    environments.c.desired_revision,
                    environments.c.observed_state,
                    environments.c.observed_revision,
                ).where(
                    environments.c.customer_id == customer_id,
                    environments.c.environment_id == environment_id,
                )
            )
        ).one_or_none()
        if env is None or env.desired_state is None:
            continue  # no desired state set yet: nothing to move towards
        pending_rows = await conn.execute(
            select(
                commands.c.id,
                commands.c.action,
                commands.c.resource_kind,
                commands.c.resource_name,
                commands.c.version,
            ).where(
                commands.c.customer_id == customer_id,
                commands.c.environment_id == environment_id,
                commands.c.status == "pending",
            )
        )
        pending = [
            PendingCommand(r.id, r.action, r.resource_kind, r.resource_name, r.version)
            for r in pending_rows
        ]
        result = reconcile(env.desired_state, env.observed_state, pending)
        if result.supersede:
            await conn.execute(
                update(commands)
                .where(commands.c.id.in_(result.supersede), commands.c.status == "pending")
                .values(status="superseded", updated_at=func.now())
            )
        if result.create:
            await conn.execute(
                insert(commands),
                [
                    {
                        "customer_id": customer_id,
                        "environment_id": environment_id,
                        "epoch": epoch,
                        "revision": env.desired_revision,
                        "action": spec.action,
                        "resource_kind": spec.kind,
                        "resource_name": spec.name,
                        "version": spec.version,
                        "partition": partition,
                        "attempts": 1,
                        "not_before": now,
                        "deadline_at": now + timedelta(seconds=ack_timeout_s),
                    }
                    for spec in result.create
                ],
            )
            created += len(result.create)
            await conn.execute(
                select(func.pg_notify(COMMANDS_CHANNEL, f"{customer_id}/{environment_id}"))
            )
        if result.converged and env.observed_revision != env.desired_revision:
            await conn.execute(
                update(environments)
                .where(
                    environments.c.customer_id == customer_id,
                    environments.c.environment_id == environment_id,
                )
                .values(observed_revision=env.desired_revision, updated_at=func.now())
            )
    return created


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

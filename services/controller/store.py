"""SQL for the apply transaction: load what a batch needs, write its plan.

Every statement runs inside the caller's transaction, which ends with the
ownership fence (``ownership.advance_fenced``); nothing here commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import case, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.controller.handlers import (
    AgentState,
    CommandRow,
    Decoded,
    KnownState,
    Plan,
    command_ids,
)
from services.shared.schema import agent_status, commands, environments, event_records


async def load_known_state(conn: AsyncConnection, batch: Sequence[Decoded]) -> KnownState:
    event_keys = list({d.event_key for d in batch})
    agent_keys = list({(d.record.customer_id, d.record.agent_id) for d in batch})
    recorded: frozenset[tuple[str, str, str]] = frozenset()
    if event_keys:
        rows = await conn.execute(
            select(
                event_records.c.customer_id, event_records.c.agent_id, event_records.c.event_id
            ).where(
                tuple_(
                    event_records.c.customer_id, event_records.c.agent_id, event_records.c.event_id
                ).in_(event_keys)
            )
        )
        recorded = frozenset((r.customer_id, r.agent_id, r.event_id) for r in rows)
    agents: dict[tuple[str, str], AgentState] = {}
    if agent_keys:
        rows = await conn.execute(
            select(agent_status).where(
                tuple_(agent_status.c.customer_id, agent_status.c.agent_id).in_(agent_keys)
            )
        )
        for r in rows:
            agents[(r.customer_id, r.agent_id)] = AgentState(
                environment_id=r.environment_id,
                boot_id=r.boot_id,
                last_seq=r.last_seq,
                last_event_at=r.last_event_at,
                last_heartbeat_at=r.last_heartbeat_at,
                resync_requested_at=r.resync_requested_at,
                resync_reason=r.resync_reason,
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
    return KnownState(recorded, agents, known_commands)


async def write_plan(conn: AsyncConnection, plan: Plan, epoch: int) -> None:
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
                index_elements=["customer_id", "agent_id"],
                set_={
                    column: statement.excluded[column]
                    for column in (
                        "environment_id",
                        "boot_id",
                        "last_seq",
                        "last_event_at",
                        "last_heartbeat_at",
                        "resync_requested_at",
                        "resync_reason",
                    )
                },
            ),
            [
                {
                    "customer_id": customer_id,
                    "agent_id": agent_id,
                    "environment_id": s.environment_id,
                    "boot_id": s.boot_id,
                    "last_seq": s.last_seq,
                    "last_event_at": s.last_event_at,
                    "last_heartbeat_at": s.last_heartbeat_at,
                    "resync_requested_at": s.resync_requested_at,
                    "resync_reason": s.resync_reason,
                }
                for (customer_id, agent_id), s in plan.agents.items()
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
            "observed_revision": current.observed_revision + new.observed_revision,
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
            "observed_revision": d.observed_reports,
            "observed_at": d.observed_at,
        }
        for (customer_id, environment_id), d in plan.environments.items()
    ]

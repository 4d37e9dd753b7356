"""Reads of fleet state (and operator keys) for the API. The API never writes these tables."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, Protocol, TypeAlias

from sqlalchemy import ColumnElement, Row, ScalarSelect, Select, Table, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.api.settings import ApiSettings
from services.shared.certificate_check import IssuerRecord
from services.shared.commands import Command, CommandResource
from services.shared.db import create_engine, pool_use
from services.shared.identity import AgentIdentity
from services.shared.operator_auth import StoredOperatorKey
from services.shared.schema import (
    agent_certificates,
    agent_status,
    commands,
    environments,
    event_records,
    issuing_cas,
    operator_audit,
    operator_keys,
)

MAX_COMMANDS_PER_REPLY: Final = 100


@dataclass(frozen=True, slots=True)
class EventStatus:
    """What the controller recorded for one agent event."""

    event_id: str
    status: Literal["applied", "rejected"]
    reason: str | None
    applied_at: datetime


@dataclass(frozen=True, slots=True)
class EnvironmentRow:
    """One environment of a customer as the controller last recorded it, plus counts."""

    environment_id: str
    last_heartbeat_at: datetime | None
    agent_version: str | None
    health: str | None
    desired_revision: int
    observed_revision: int
    pending_commands: int
    agents: int


@dataclass(frozen=True, slots=True)
class PendingCommands:
    """Commands an environment's agents may run now, and when the next one becomes ready."""

    commands: list[Command]
    """Pending and due (``not_before`` passed), oldest first, at most MAX_COMMANDS_PER_REPLY."""
    next_due_in_s: float | None = None
    """Seconds until the earliest pending command not yet due is due; None if there is none.

    A re-offered command is held back (``not_before`` in the future) and no NOTIFY
    announces the moment it becomes due, so a waiting poll wakes itself then.
    """
    due_for_s: tuple[float, ...] = ()
    """For each of ``commands``, seconds since its current offer became due (now minus
    ``not_before``, both on the database's clock) when the query ran; empty when unknown.
    Measures command delivery latency (services/api/delivery.py)."""


AuditRecord: TypeAlias = Any
"""One ``operator_audit`` row without its ``customer_id``, read by attribute name.

Not a second list of the columns: the table (services/shared/schema.py) lists
them and the answer model (services/api/models.py ``AuditEntry``) validates from
the attributes, so the row is checked against the wire shape where it is answered.
"""


class FleetRepository(Protocol):
    """Read access to fleet state, always scoped to the caller's identity or customer."""

    async def event_status(self, identity: AgentIdentity, event_id: str) -> EventStatus | None:
        """The record of ``event_id`` sent by exactly this agent, or None if not (yet) recorded.

        Never returns another agent's, environment's or customer's record.
        """
        ...

    async def pending_commands(self, customer_id: str, environment_id: str) -> PendingCommands:
        """The environment's pending commands that are due; never another environment's."""
        ...

    async def environments(self, customer_id: str) -> list[EnvironmentRow]:
        """Every environment the controller recorded for the customer, sorted by id."""
        ...

    async def audit(self, customer_id: str, *, limit: int) -> Sequence[AuditRecord]:
        """The customer's latest ``limit`` operator changes as applied, newest first."""
        ...

    async def operator_key(self, key_id: str) -> StoredOperatorKey | None:
        """The key with this id unless it is unknown or revoked."""
        ...

    async def issuer(self, subject_dn: str) -> IssuerRecord | None:
        """The registered issuing CA with this subject DN, or None."""
        ...

    async def certificate_issued_at(self, serial: str) -> datetime | None:
        """When gateway_auth issued the certificate with this serial (normalised), or None."""
        ...

    async def ping(self) -> None:
        """Return when the database answers a trivial query; raise otherwise."""
        ...

    def pool_use(self) -> dict[str, int]:
        """The database pool now (services.shared.db.pool_use); empty without a pool."""
        ...


def event_status_query(identity: AgentIdentity, event_id: str) -> Select[Any]:
    """The one event record of this agent, scoped by every part of its identity."""
    return select(event_records.c.status, event_records.c.reason, event_records.c.applied_at).where(
        # The whole key: one agent id may be enrolled in several environments of a
        # customer, as different agents.
        event_records.c.customer_id == identity.customer_id,
        event_records.c.environment_id == identity.environment_id,
        event_records.c.agent_id == identity.agent_id,
        event_records.c.event_id == event_id,
    )


def _for_environment(customer_id: str, environment_id: str) -> tuple[Any, ...]:
    return (
        commands.c.customer_id == customer_id,
        commands.c.environment_id == environment_id,
        commands.c.status == "pending",
    )


def due_commands_query(customer_id: str, environment_id: str) -> Select[Any]:
    """Pending, due commands of one environment, oldest first, capped."""
    return (
        select(
            commands.c.id,
            commands.c.epoch,
            commands.c.revision,
            commands.c.action,
            commands.c.resource_kind,
            commands.c.resource_name,
            commands.c.version,
            commands.c.attempts,
            # The database's clock on both sides: not_before is written with now().
            func.extract("epoch", func.now() - commands.c.not_before).label("due_for_s"),
        )
        .where(*_for_environment(customer_id, environment_id), commands.c.not_before <= func.now())
        .order_by(commands.c.id)
        .limit(MAX_COMMANDS_PER_REPLY)
    )


def next_due_query(customer_id: str, environment_id: str) -> Select[Any]:
    """Seconds until the environment's earliest held-back pending command is due (or NULL)."""
    return select(
        func.extract("epoch", func.min(commands.c.not_before) - func.now()).label("due_in_s")
    ).where(*_for_environment(customer_id, environment_id), commands.c.not_before > func.now())


def command_from_row(row: Row[Any] | Any) -> Command:
    """The agent's view of a commands row (see services.shared.commands)."""
    return Command(
        id=row.id,
        epoch=row.epoch,
        revision=row.revision,
        action=row.action,
        resource=CommandResource(
            kind=row.resource_kind,
            name=row.resource_name,
            version=None if row.action == "delete" else row.version,
        ),
        # The controller writes attempts=1 on creation; the column's default of 0
        # would only show for a row written by hand, which is still a first offer.
        attempt=max(row.attempts, 1),
    )


def _environment_count(table: Table, *where: ColumnElement[bool]) -> ScalarSelect[int]:
    """Rows of ``table`` in the outer query's environment (and ``where``), as a column."""
    return (
        select(func.count())
        .select_from(table)
        .where(
            table.c.customer_id == environments.c.customer_id,
            table.c.environment_id == environments.c.environment_id,
            *where,
        )
        .correlate(environments)
        .scalar_subquery()
    )


def environments_query(customer_id: str) -> Select[Any]:
    """The customer's environments with their pending-command and agent counts, by id."""
    pending = _environment_count(commands, commands.c.status == "pending")
    agents = _environment_count(agent_status)
    return (
        select(
            environments.c.environment_id,
            environments.c.last_heartbeat_at,
            environments.c.agent_version,
            environments.c.health,
            environments.c.desired_revision,
            environments.c.observed_revision,
            pending.label("pending_commands"),
            agents.label("agents"),
        )
        .where(environments.c.customer_id == customer_id)
        .order_by(environments.c.environment_id)
    )


def audit_query(customer_id: str, limit: int) -> Select[Any]:
    """The customer's audit entries, newest first: every column but the customer's id."""
    return (
        select(*(c for c in operator_audit.c if c is not operator_audit.c.customer_id))
        .where(operator_audit.c.customer_id == customer_id)
        .order_by(operator_audit.c.accepted_at.desc(), operator_audit.c.change_id)
        .limit(limit)
    )


def operator_key_query(key_id: str) -> Select[Any]:
    """The key with this id, only while it is not revoked."""
    return select(
        operator_keys.c.key_id, operator_keys.c.secret_sha256, operator_keys.c.customer_id
    ).where(operator_keys.c.key_id == key_id, operator_keys.c.revoked_at.is_(None))


class SqlFleetRepository:
    """FleetRepository on PostgreSQL. Does not own ``engine``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def event_status(self, identity: AgentIdentity, event_id: str) -> EventStatus | None:
        query = event_status_query(identity, event_id)
        async with self.engine.connect() as connection:
            row = (await connection.execute(query)).one_or_none()
        if row is None:
            return None
        status: Literal["applied", "rejected"] = (
            "applied" if row.status == "applied" else "rejected"
        )
        return EventStatus(event_id, status, row.reason, row.applied_at)

    async def pending_commands(self, customer_id: str, environment_id: str) -> PendingCommands:
        async with self.engine.connect() as connection:
            rows = (await connection.execute(due_commands_query(customer_id, environment_id))).all()
            due_in_s = None
            if not rows:
                due_in_s = (
                    await connection.execute(next_due_query(customer_id, environment_id))
                ).scalar_one()
        return PendingCommands(
            [command_from_row(row) for row in rows],
            None if due_in_s is None else max(float(due_in_s), 0.0),
            tuple(float(row.due_for_s) for row in rows),
        )

    async def environments(self, customer_id: str) -> list[EnvironmentRow]:
        async with self.engine.connect() as connection:
            rows = (await connection.execute(environments_query(customer_id))).all()
        return [EnvironmentRow(**r._mapping) for r in rows]

    async def audit(self, customer_id: str, *, limit: int) -> Sequence[AuditRecord]:
        async with self.engine.connect() as connection:
            result = await connection.execute(audit_query(customer_id, limit))
            rows: Sequence[AuditRecord] = result.all()
        return rows

    async def operator_key(self, key_id: str) -> StoredOperatorKey | None:
        async with self.engine.connect() as connection:
            row = (await connection.execute(operator_key_query(key_id))).one_or_none()
        if row is None:
            return None
        return StoredOperatorKey(row.key_id, bytes(row.secret_sha256), row.customer_id)

    async def issuer(self, subject_dn: str) -> IssuerRecord | None:
        query = select(issuing_cas.c.retire_at).where(issuing_cas.c.subject_dn == subject_dn)
        async with self.engine.connect() as connection:
            row = (await connection.execute(query)).one_or_none()
        return None if row is None else IssuerRecord(subject_dn, row.retire_at)

    async def certificate_issued_at(self, serial: str) -> datetime | None:
        query = select(agent_certificates.c.issued_at).where(agent_certificates.c.serial == serial)
        async with self.engine.connect() as connection:
            issued_at: datetime | None = (await connection.execute(query)).scalar_one_or_none()
        return issued_at

    async def ping(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    def pool_use(self) -> dict[str, int]:
        return pool_use(self.engine)


@asynccontextmanager
async def sql_repository(settings: ApiSettings) -> AsyncIterator[SqlFleetRepository]:
    """A repository on a new engine (connects lazily); the engine is disposed on exit."""
    engine = create_engine(settings.database, application_name="fleetplane-api")
    try:
        yield SqlFleetRepository(engine)
    finally:
        await engine.dispose()

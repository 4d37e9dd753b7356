"""Reads of fleet state for the API. The API never writes fleet tables."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from sqlalchemy import Select, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.api.settings import ApiSettings
from services.shared.db import create_engine
from services.shared.identity import AgentIdentity
from services.shared.schema import event_records


@dataclass(frozen=True, slots=True)
class EventStatus:
    """What the controller recorded for one agent event."""

    event_id: str
    status: Literal["applied", "rejected"]
    reason: str | None
    applied_at: datetime


class FleetRepository(Protocol):
    """Read access to fleet state, always scoped to the caller's identity."""

    async def event_status(self, identity: AgentIdentity, event_id: str) -> EventStatus | None:
        """The record of ``event_id`` sent by exactly this agent, or None if not (yet) recorded.

        Never returns another agent's, environment's or customer's record.
        """
        ...

    async def ping(self) -> None:
        """Return when the database answers a trivial query; raise otherwise."""
        ...


def event_status_query(identity: AgentIdentity, event_id: str) -> Select[Any]:
    """The one event record of this agent, scoped by every part of its identity."""
    return select(event_records.c.status, event_records.c.reason, event_records.c.applied_at).where(
        event_records.c.customer_id == identity.customer_id,
        event_records.c.agent_id == identity.agent_id,
        event_records.c.event_id == event_id,
        # Redundant with the key when agent ids are unique per customer, and
        # keeps an environment's data its own if they ever are not.
        event_records.c.environment_id == identity.environment_id,
    )


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

    async def ping(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))


@asynccontextmanager
async def sql_repository(settings: ApiSettings) -> AsyncIterator[SqlFleetRepository]:
    """A repository on a new engine (connects lazily); the engine is disposed on exit."""
    engine = create_engine(settings.database, application_name="fleetplane-api")
    try:
        yield SqlFleetRepository(engine)
    finally:
        await engine.dispose()

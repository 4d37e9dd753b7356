"""Shapes of the API's JSON answers, as pydantic models.

Handlers build their answers from these (so an answer cannot drift from its
shape) and ``openapi.py`` generates the document's schemas from them. Request
bodies and the commands reply are shared contracts in ``services.shared``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, WithJsonSchema


def _iso_utc(moment: datetime) -> str:
    # PostgreSQL hands back timestamps in the session's time zone; answers are UTC.
    return moment.astimezone(UTC).isoformat()


Timestamp = Annotated[
    datetime,
    PlainSerializer(_iso_utc, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}, mode="serialization"),
]
"""A point in time, answered as RFC 3339 in UTC (``2026-01-02T03:04:05+00:00``)."""

Liveness = Literal["connected", "unknown", "lost", "never_seen"]


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProblemFieldError(_Answer):
    field: str
    """JSON-path-like location of the invalid input (``events[3].payload.health``, ``wait``)."""
    message: str


class ProblemDetails(_Answer):
    """An RFC 9457 problem (``application/problem+json``): every 4xx and 5xx of the API."""

    type: str
    """Stable URN (``urn:fleetplane:problem:<slug>``); match on this, not on ``title``."""
    title: str
    status: int
    detail: str
    """What was wrong with this request and how to fix it."""
    request_id: str | None = None
    errors: list[ProblemFieldError] | None = None
    """For 422: one entry per invalid field (at most 50)."""
    errors_truncated: bool | None = None


class HealthReply(_Answer):
    status: Literal["ok"]


class ReadyReply(_Answer):
    status: Literal["ready"]
    checks: dict[str, Literal["ok"]]


class EventsAccepted(_Answer):
    """Every event of the batch, acknowledged by Kafka, in batch order."""

    accepted: list[str]


class EventStatusReply(_Answer):
    """What became of one of the caller's events; ``pending`` until the controller recorded it.

    ``reason`` and ``applied_at`` are present once the event is applied or rejected.
    """

    id: str
    status: Literal["pending", "applied", "rejected"]
    reason: str | None = None
    applied_at: Timestamp | None = None


class DesiredStateAccepted(_Answer):
    """The change is on the events topic; the owning controller applies it in order."""

    change_id: str
    """Id of the change, recorded in the operator audit when the controller applies it."""
    revision: int


class EnvironmentView(_Answer):
    environment_id: str
    liveness: Liveness
    """Derived when read from ``last_heartbeat_at``: a silent environment goes stale by itself."""
    last_heartbeat_at: Timestamp | None
    agent_version: str | None
    health: str | None
    desired_revision: int
    observed_revision: int
    """The desired revision the observed state matches (0: none yet)."""
    pending_commands: int
    agents: int
    """Agents that have reported from this environment."""


class EnvironmentsReply(_Answer):
    environments: list[EnvironmentView]
    """Sorted by ``environment_id``."""


class AuditEntry(_Answer):
    change_id: str
    environment_id: str
    operator: str
    """Id of the operator key that made the change."""
    action: str
    revision: int
    outcome: str
    reason: str | None
    request_id: str | None
    accepted_at: Timestamp
    applied_at: Timestamp


class AuditReply(_Answer):
    entries: Annotated[list[AuditEntry], Field(description="Newest first.")]

"""Events-topic records written straight to Kafka, past the API.

Tests and benchmarks that feed the controllers directly (a pre-filled topic, a
poison record beside good ones, a steady producer) build their records here, from
the same contract the API produces with, so they cannot drift from it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from services.shared.events import (
    AgentEventRecord,
    CommandResultEvent,
    CommandResultPayload,
    HeartbeatEvent,
    HeartbeatPayload,
    ObservedResource,
    ObservedStateEvent,
    ObservedStatePayload,
)


def heartbeat_record(
    customer: str,
    event_id: str,
    seq: int,
    *,
    environment: str = "prod",
    agent: str = "agent-1",
    agent_version: str = "1.4.2",
) -> dict[str, Any]:
    """One heartbeat as the API would put it on the topic, as a JSON-ready dict."""
    record = AgentEventRecord(
        customer_id=customer,
        environment_id=environment,
        agent_id=agent,
        accepted_at=datetime.now(UTC),
        event=HeartbeatEvent(
            id=event_id,
            boot_id="boot-1",
            seq=seq,
            type="heartbeat",
            payload=HeartbeatPayload(agent_version=agent_version, health="ok"),
        ),
    )
    as_json: dict[str, Any] = record.model_dump(mode="json", exclude_none=True)
    return as_json


def encode(record: dict[str, Any]) -> bytes:
    """The record's bytes on the topic (the key is the customer id, set by the sender)."""
    return json.dumps(record).encode()


def observed_state_record(
    customer: str,
    event_id: str,
    seq: int,
    resources: list[dict[str, str]],
    *,
    environment: str = "prod",
    agent: str = "agent-1",
) -> dict[str, Any]:
    """One observed-state report (the agent's full state) as the API would put it on the topic."""
    record = AgentEventRecord(
        customer_id=customer,
        environment_id=environment,
        agent_id=agent,
        accepted_at=datetime.now(UTC),
        event=ObservedStateEvent(
            id=event_id,
            boot_id="boot-1",
            seq=seq,
            type="observed_state",
            payload=ObservedStatePayload(
                resources=[ObservedResource.model_validate(r) for r in resources]
            ),
        ),
    )
    as_json: dict[str, Any] = record.model_dump(mode="json", exclude_none=True)
    return as_json


def command_result_record(
    customer: str,
    event_id: str,
    seq: int,
    command_id: int,
    *,
    environment: str = "prod",
    agent: str = "agent-1",
) -> dict[str, Any]:
    """One command result as the API would put it on the topic."""
    record = AgentEventRecord(
        customer_id=customer,
        environment_id=environment,
        agent_id=agent,
        accepted_at=datetime.now(UTC),
        event=CommandResultEvent(
            id=event_id,
            boot_id="boot-1",
            seq=seq,
            type="command_result",
            payload=CommandResultPayload(
                command_id=command_id, epoch=1, outcome="succeeded", message="done"
            ),
        ),
    )
    as_json: dict[str, Any] = record.model_dump(mode="json", exclude_none=True)
    return as_json

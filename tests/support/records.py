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
    return _on_topic(
        customer,
        environment,
        agent,
        HeartbeatEvent(
            id=event_id,
            boot_id="boot-1",
            seq=seq,
            type="heartbeat",
            payload=HeartbeatPayload(agent_version=agent_version, health="ok"),
        ),
    )


def _on_topic(customer: str, environment: str, agent: str, event: Any) -> dict[str, Any]:
    """The record the API would put on the topic for this agent's event, JSON-ready."""
    record = AgentEventRecord(
        customer_id=customer,
        environment_id=environment,
        agent_id=agent,
        accepted_at=datetime.now(UTC),
        event=event,
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
    return _on_topic(
        customer,
        environment,
        agent,
        ObservedStateEvent(
            id=event_id,
            boot_id="boot-1",
            seq=seq,
            type="observed_state",
            payload=ObservedStatePayload(
                resources=[ObservedResource.model_validate(r) for r in resources]
            ),
        ),
    )


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
    return _on_topic(
        customer,
        environment,
        agent,
        CommandResultEvent(
            id=event_id,
            boot_id="boot-1",
            seq=seq,
            type="command_result",
            payload=CommandResultPayload(
                command_id=command_id, epoch=1, outcome="succeeded", message="done"
            ),
        ),
    )


# The contract refuses every value PostgreSQL would (tests/integration/test_contract_limits.py),
# so a refusal the controller meets is one nobody foresaw: a constraint added later,
# a limit of a new column. A trigger stands for it, refusing one marked record with
# SQLSTATE 22023 (invalid_parameter_value) as the server would.
REFUSE_MARKED = """
CREATE FUNCTION refuse_marked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.event_id LIKE 'refused-%' THEN
        RAISE EXCEPTION 'value refused for %', NEW.event_id USING ERRCODE = '22023';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_marked BEFORE INSERT ON event_records
    FOR EACH ROW EXECUTE FUNCTION refuse_marked();
"""

"""Agent events through the real nginx edge, API, Kafka and controller into PostgreSQL."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.invariants import Ledger, check
from tests.support.waiting import eventually

AgentFactory = Any


async def post_accepted(agent: AgentClient, events: list[dict[str, Any]], ledger: Ledger) -> None:
    status, body = await agent.post_events(events)
    assert status == 202, body
    assert body["accepted"] == [e["id"] for e in events]
    ledger.record(agent.customer_id, agent.environment_id, agent.agent_id, events)


async def test_events_are_applied_in_order_and_reported_applied(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    deployment.start_controller()
    agent: AgentClient = agents("acme", "prod", "agent-1")
    ledger = Ledger()
    batches = [
        [
            agent.heartbeat(),
            agent.observed([{"name": "web", "kind": "deployment", "version": "1.0.0"}]),
        ],
        [agent.heartbeat(message="all good; DROP TABLE is just text")],
        [agent.heartbeat(health="degraded") for _ in range(20)],
    ]
    for batch in batches:
        await post_accepted(agent, batch, ledger)

    last = batches[-1][-1]["id"]
    status = await eventually(
        lambda: agent.event_status(last),
        lambda r: r[1].get("status") == "applied",
        what="last event applied",
    )
    assert status[0] == 200
    for event in batches[0]:
        code, body = await agent.event_status(event["id"])
        assert (code, body["status"]) == (200, "applied")

    report = check(ledger, deployment.fleet.stack.admin_dsn(deployment.fleet.database_name))
    assert report.ok, report
    assert report.recorded == report.accepted == 23
    with psycopg.connect(deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)) as conn:
        env = conn.execute(
            "SELECT health, agent_version, observed_reports, observed_state "
            "FROM environments WHERE customer_id = 'acme' AND environment_id = 'prod'"
        ).fetchone()
        seqs = [
            r[0]
            for r in conn.execute(
                'SELECT seq FROM event_records WHERE agent_id = %s ORDER BY "offset"',
                (agent.agent_id,),
            )
        ]
    assert env is not None
    assert env[0] == "degraded"
    assert env[2] == 1
    assert env[3] == [{"name": "web", "kind": "deployment", "version": "1.0.0", "status": ""}]
    assert seqs == list(range(1, 24))


async def test_unknown_event_id_is_pending(deployment: Deployment, agents: AgentFactory) -> None:
    deployment.start_apis()
    agent: AgentClient = agents("acme", "prod", "agent-1")
    code, body = await agent.event_status("never-sent")
    assert (code, body["status"]) == (200, "pending")

"""One agent id in two environments of a customer is two agents, end to end.

Enrollment names an agent within its environment, so ``agent-1`` of ``prod`` and
``agent-1`` of ``staging`` are different agents with their own certificates. Through
the real edge, API, Kafka, controller and PostgreSQL: each one's events, sequence,
status and command results stay its own, even with the same boot id and the same
event ids, and a late event of an agent's previous boot does not move it back.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.invariants import Ledger, check
from tests.support.operators import OperatorClient
from tests.support.waiting import eventually

AgentFactory = Any
WEB = {"kind": "deployment", "name": "web", "version": "2.0.0"}
JOB = {"kind": "job", "name": "migrate", "version": "1.0.0"}


def named(event: dict[str, Any], event_id: str) -> dict[str, Any]:
    """The event under an id the test chooses (both agents use the same ones)."""
    return {**event, "id": event_id}


def rows(deployment: Deployment, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)) as conn:
        return conn.execute(query, params).fetchall()


async def post(agent: AgentClient, events: list[dict[str, Any]], ledger: Ledger) -> None:
    status, body = await agent.post_events(events)
    assert status == 202, body
    ledger.record(agent.customer_id, agent.environment_id, agent.agent_id, events)


async def settled(agent: AgentClient, event_id: str) -> dict[str, Any]:
    """The agent's own record of ``event_id``, once the controller wrote it."""
    reply = await eventually(
        lambda: agent.event_status(event_id),
        lambda r: r[0] == 200 and r[1]["status"] != "pending",
        what=f"{agent.environment_id}/{agent.agent_id} event {event_id} recorded",
    )
    return reply[1]


async def commands_for(agent: AgentClient) -> list[dict[str, Any]]:
    reply = await eventually(
        lambda: agent.poll_commands(0),
        lambda r: r[0] == 200 and bool(r[1]["commands"]),
        what=f"commands for {agent.environment_id}",
    )
    commands: list[dict[str, Any]] = reply[1]["commands"]
    return commands


@pytest.mark.timeout(120)
async def test_same_agent_id_in_two_environments_keeps_its_own_state(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    deployment.start_controller()
    operator = OperatorClient(
        deployment.fleet.stack.pki_dir,
        deployment.operator_key("acme"),
        deployment.fleet.stack.operator_url,
    )
    prod: AgentClient = agents("acme", "prod", "agent-1")
    staging: AgentClient = agents("acme", "staging", "agent-1")
    # The same boot id too: with agents keyed by (customer, agent), staging's seq 3
    # was refused as stale behind prod's 5, and its ev-1 dropped as prod's duplicate.
    prod.boot_id = staging.boot_id = "boot-shared"
    ledger = Ledger()
    assert (await operator.set_desired("acme", "prod", 1, [WEB]))[0] == 202
    assert (await operator.set_desired("acme", "staging", 1, [JOB]))[0] == 202

    await post(prod, [named(prod.heartbeat(), "ev-1"), named(prod.observed([]), "ev-2")], ledger)
    await post(
        staging, [named(staging.heartbeat(), "ev-1"), named(staging.observed([]), "ev-2")], ledger
    )
    await post(prod, [named(prod.heartbeat(), f"ev-{n}") for n in (3, 4, 5)], ledger)
    await post(staging, [named(staging.heartbeat(health="degraded"), "ev-3")], ledger)

    for agent, ids in ((prod, range(1, 6)), (staging, range(1, 4))):
        for n in ids:
            record = await settled(agent, f"ev-{n}")
            assert record["status"] == "applied", (agent.environment_id, record)

    status = rows(
        deployment,
        "SELECT environment_id, agent_id, boot_id, last_seq, resync_reason FROM agent_status"
        " ORDER BY environment_id",
    )
    # Each first boot's resync request was satisfied by its own report; no flips.
    assert status == [
        ("prod", "agent-1", "boot-shared", 5, None),
        ("staging", "agent-1", "boot-shared", 3, None),
    ]
    health = rows(deployment, "SELECT environment_id, health FROM environments ORDER BY 1")
    assert health == [("prod", "ok"), ("staging", "degraded")]

    # Commands: each agent sees its environment's, settles its own (with the same
    # event id as the other's result), and cannot settle the other's.
    prod_commands = await commands_for(prod)
    staging_commands = await commands_for(staging)
    assert [c["resource"]["name"] for c in prod_commands] == ["web"]
    assert [c["resource"]["name"] for c in staging_commands] == ["migrate"]
    prod_command, staging_command = prod_commands[0], staging_commands[0]
    await post(
        staging,
        [named(staging.command_result(prod_command["id"], prod_command["epoch"]), "ev-4")],
        ledger,
    )
    await post(
        prod,
        [named(prod.command_result(prod_command["id"], prod_command["epoch"]), "ev-6")],
        ledger,
    )
    await post(
        staging,
        [
            named(
                staging.command_result(staging_command["id"], staging_command["epoch"], "failed"),
                "ev-6",
            )
        ],
        ledger,
    )
    foreign = await settled(staging, "ev-4")
    assert (foreign["status"], foreign["reason"]) == (
        "rejected",
        f"unknown command {prod_command['id']}",
    )
    assert (await settled(prod, "ev-6"))["status"] == "applied"
    assert (await settled(staging, "ev-6"))["status"] == "applied"
    assert rows(deployment, "SELECT environment_id, status FROM commands ORDER BY 1") == [
        ("prod", "succeeded"),
        ("staging", "failed"),
    ]

    # A late event of prod's previous boot: its heartbeat does not move prod back to
    # that boot nor overwrite the newer health; its command result still settles.
    assert (await operator.set_desired("acme", "prod", 2, [WEB, JOB]))[0] == 202
    # migrate stays pending after the new boot reports web (web's command is superseded).
    late_command = next(c for c in await commands_for(prod) if c["resource"]["name"] == "migrate")
    late_heartbeat = named(prod.heartbeat(health="failing"), "late-1")
    late_result = named(prod.command_result(late_command["id"], late_command["epoch"]), "late-2")
    left = prod.reboot()
    await post(
        prod, [named(prod.heartbeat(), "new-1"), named(prod.observed([WEB]), "new-2")], ledger
    )
    assert (await settled(prod, "new-2"))["status"] == "applied"
    await post(prod, [late_heartbeat, late_result], ledger)
    late = await settled(prod, "late-1")
    assert (late["status"], late["reason"]) == (
        "rejected",
        f"late event of previous boot {left}: agent is at boot {prod.boot_id}",
    )
    assert (await settled(prod, "late-2"))["status"] == "applied"
    assert rows(deployment, "SELECT status FROM commands WHERE id = %s", late_command["id"]) == [
        ("succeeded",)
    ]
    status = rows(
        deployment,
        "SELECT environment_id, boot_id, last_seq, resync_reason, previous_boots"
        " FROM agent_status ORDER BY environment_id",
    )
    assert status == [
        ("prod", prod.boot_id, 2, None, [left]),
        ("staging", "boot-shared", 5, None, []),
    ]
    assert rows(deployment, "SELECT health FROM environments WHERE environment_id = 'prod'") == [
        ("ok",)
    ]

    report = check(ledger, deployment.fleet.stack.admin_dsn(deployment.fleet.database_name))
    assert report.ok, report
    assert report.recorded == report.accepted == len(ledger)

"""Operators, commands and long-polls on the real edge, API, Kafka, controller and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp
import psycopg
from aiokafka import AIOKafkaProducer

from bench.simulator.state import AgentState, Decision
from services.shared.commands import Command
from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.operators import OperatorClient
from tests.support.waiting import eventually

AgentFactory = Any
WEB = {"kind": "deployment", "name": "web", "version": "2.0.0"}
JOB = {"kind": "job", "name": "migrate", "version": "1.0.0"}


def rows(deployment: Deployment, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)) as conn:
        return conn.execute(query, params).fetchall()


async def test_desired_state_reaches_a_waiting_long_poll_and_converges(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    deployment.start_controller()
    operator = OperatorClient(
        deployment.fleet.stack.pki_dir,
        deployment.operator_key("acme"),
        deployment.fleet.stack.operator_url,
    )
    agent: AgentClient = agents("acme", "prod", "agent-1")
    running = [{"kind": "deployment", "name": "web", "version": "1.0.0"}]
    assert (await agent.post_events([agent.heartbeat(), agent.observed(running)]))[0] == 202

    # The poll waits first; the operator's change must wake it well before `wait` ends.
    poll = asyncio.create_task(agent.poll_commands(20))
    await deployment.until_long_polls_wait()
    started = time.monotonic()
    status, body = await operator.set_desired("acme", "prod", 1, [WEB, JOB])
    assert status == 202, body
    status, reply = await poll
    woken_after = time.monotonic() - started
    assert status == 200, reply
    assert woken_after < 10, f"woken after {woken_after:.1f} s: by the timeout, not NOTIFY"
    commands = reply["commands"]
    assert sorted(
        (c["action"], c["resource"]["name"], c["resource"]["version"]) for c in commands
    ) == [
        ("create", "migrate", "1.0.0"),
        ("update", "web", "2.0.0"),
    ]
    assert all(c["revision"] == 1 and c["epoch"] >= 1 for c in commands)

    results = [agent.command_result(c["id"], c["epoch"]) for c in commands]
    assert (await agent.post_events([*results, agent.observed([WEB, JOB])]))[0] == 202

    async def environment() -> dict[str, Any]:
        envs: list[dict[str, Any]] = (await operator.environments("acme"))[1]["environments"]
        return envs[0]

    env = await eventually(
        environment,
        lambda e: e["observed_revision"] == e["desired_revision"] == 1,
        what="environment converged",
    )
    assert env["pending_commands"] == 0
    assert env["liveness"] == "connected"
    statuses = rows(deployment, "SELECT status FROM commands ORDER BY id")
    assert statuses == [("succeeded",), ("succeeded",)]
    audit = rows(deployment, "SELECT operator, action, revision, outcome FROM operator_audit")
    assert [(a[1], a[2], a[3]) for a in audit] == [("set_desired_state", 1, "applied")]


async def delivery_samples(deployment: Deployment, port: int) -> dict[str, dict[str, float]]:
    """``{became_due: {"count": n, "sum": s}}`` of the delivery histogram on one API's /metrics."""
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=deployment.api_ssl_context())
        ) as session,
        session.get(f"https://127.0.0.1:{port}/metrics") as reply,
    ):
        text = await reply.text()
    found: dict[str, dict[str, float]] = {}
    for became_due in ("during_poll", "before_poll"):
        for suffix in ("count", "sum"):
            prefix = (
                f'fleetplane_api_command_delivery_seconds_{suffix}{{became_due="{became_due}"}} '
            )
            line = next(line for line in text.splitlines() if line.startswith(prefix))
            found.setdefault(became_due, {})[suffix] = float(line.removeprefix(prefix))
    return found


async def test_command_delivery_latency_is_observed_once_per_offer_through_the_edge(
    deployment: Deployment, agents: AgentFactory
) -> None:
    # One API process, so every poll through the edge reaches it (each process
    # counts an offer once: two would each count it).
    port = deployment.fleet.stack.api_ports[0]
    deployment.start_api(port)
    deployment.start_controller()
    operator = OperatorClient(
        deployment.fleet.stack.pki_dir,
        deployment.operator_key("acme"),
        deployment.fleet.stack.operator_url,
    )
    agent: AgentClient = agents("acme", "prod", "agent-1")
    assert (await agent.post_events([agent.heartbeat(), agent.observed([])]))[0] == 202
    before = await delivery_samples(deployment, port)
    assert before == {
        "during_poll": {"count": 0, "sum": 0},
        "before_poll": {"count": 0, "sum": 0},
    }, "both series exist from start-up, empty"

    poll = asyncio.create_task(agent.poll_commands(20))
    started = time.monotonic()
    status, body = await operator.set_desired("acme", "prod", 1, [WEB, JOB])
    assert status == 202, body
    status, reply = await poll
    assert status == 200, reply
    assert len(reply["commands"]) == 2
    within_s = time.monotonic() - started
    first = await delivery_samples(deployment, port)
    assert first["during_poll"]["count"] + first["before_poll"]["count"] == 2
    # Each offer waited at most from the operator's change to the reply.
    assert first["during_poll"]["sum"] + first["before_poll"]["sum"] <= 2 * within_s

    # No result yet: the next polls hand out the same two offers, counted no more.
    for _ in range(2):
        status, again = await agent.poll_commands(5)
        assert status == 200, again
        assert {c["id"] for c in again["commands"]} == {c["id"] for c in reply["commands"]}
    assert await delivery_samples(deployment, port) == first
    print(f"command delivery: {first} (change to reply {within_s:.3f} s)")


async def produce_change(deployment: Deployment, change_id: str, revision: int) -> None:
    record = {
        "schema_version": 1,
        "kind": "desired_state",
        "change_id": change_id,
        "customer_id": "acme",
        "environment_id": "prod",
        "operator": "replayer",
        "accepted_at": datetime.now(UTC).isoformat(),
        "desired": {"revision": revision, "resources": [WEB]},
    }
    producer = AIOKafkaProducer(
        bootstrap_servers=deployment.fleet.stack.kafka_bootstrap, acks="all"
    )
    await producer.start()
    try:
        await producer.send_and_wait(
            deployment.fleet.events_topic, json.dumps(record).encode(), key=b"acme"
        )
    finally:
        await producer.stop()


async def test_redelivered_or_repeated_changes_create_no_duplicate_commands(
    deployment: Deployment,
) -> None:
    deployment.start_controller()
    change_id = uuid.uuid4().hex
    for _ in range(3):  # the same change delivered three times
        await produce_change(deployment, change_id, 1)
    await produce_change(deployment, uuid.uuid4().hex, 2)  # same resources, new revision

    async def audited() -> int:
        return len(rows(deployment, "SELECT 1 FROM operator_audit"))

    await eventually(audited, lambda n: n == 2, what="both changes audited")
    await asyncio.sleep(1)
    commands = rows(deployment, "SELECT action, resource_name, version, status FROM commands")
    assert commands == [("create", "web", "2.0.0", "pending")]


async def test_silent_agent_becomes_unknown_then_lost(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis(
        {"FLEETPLANE_API_LIVENESS_CONNECTED_S": "2", "FLEETPLANE_API_LIVENESS_LOST_S": "5"}
    )
    deployment.start_controller()
    operator = OperatorClient(
        deployment.fleet.stack.pki_dir,
        deployment.operator_key(None),
        deployment.fleet.stack.operator_url,
    )
    agent: AgentClient = agents("acme", "prod", "agent-1")
    assert (await agent.post_events([agent.heartbeat()]))[0] == 202

    async def liveness() -> str:
        status, body = await operator.environments("acme")
        assert status == 200, body
        envs = body["environments"]
        return str(envs[0]["liveness"]) if envs else "absent"

    await eventually(liveness, lambda s: s == "connected", what="connected")
    # No event arrives from here on; only time passes.
    await eventually(liveness, lambda s: s == "unknown", timeout_s=10, what="unknown")
    await eventually(liveness, lambda s: s == "lost", timeout_s=10, what="lost")


async def test_tenants_and_roles_are_isolated(deployment: Deployment, agents: AgentFactory) -> None:
    deployment.start_apis()
    deployment.start_controller()
    pki = deployment.fleet.stack.pki_dir
    url = deployment.fleet.stack.operator_url
    acme_ops = OperatorClient(pki, deployment.operator_key("acme"), url)
    globex_ops = OperatorClient(pki, deployment.operator_key("globex"), url)

    # An operator key scoped to one customer can neither change nor read another.
    status, body = await acme_ops.set_desired("globex", "prod", 1, [WEB])
    assert status in (403, 404), body
    status, body = await acme_ops.environments("globex")
    assert status in (403, 404), body
    assert "globex" not in json.dumps(body.get("environments", []))
    status, _ = await globex_ops.set_desired("globex", "prod", 1, [WEB])
    assert status == 202

    # No key, or a made-up one: refused.
    anonymous = OperatorClient(pki, "fpk_000000000000_" + "x" * 43, url)
    assert (await anonymous.environments("acme"))[0] == 401

    # An agent certificate cannot reach operator routes through the agent listener.
    agent: AgentClient = agents("acme", "prod", "agent-1")
    status, body = await agent.get("/v1/operator/customers/acme/environments")
    assert status in (403, 404), body

    # Each agent's long-poll sees only its own environment's commands.
    globex_prod: AgentClient = agents("globex", "prod", "agent-1")
    globex_dev: AgentClient = agents("globex", "dev", "agent-1")

    async def poll(a: AgentClient) -> list[dict[str, Any]]:
        status, reply = await a.poll_commands(0)
        assert status == 200, reply
        return list(reply["commands"])

    await eventually(lambda: poll(globex_prod), lambda c: len(c) == 1, what="globex/prod command")
    assert await poll(globex_dev) == []
    assert await poll(agent) == []


async def test_agent_ignores_a_command_from_an_older_epoch(
    deployment: Deployment, agents: AgentFactory
) -> None:
    """The agent's rule, on commands delivered by the real long-poll.

    A command of an older epoch can only come from a controller that lost the
    partition; the fence keeps such writes out, and the agent's rule is the
    second line. The old-epoch row is written here directly, as a zombie would
    have written it had the fence not stopped it.
    """
    deployment.start_apis()
    first = deployment.start_controller("first")
    operator = OperatorClient(
        deployment.fleet.stack.pki_dir,
        deployment.operator_key("acme"),
        deployment.fleet.stack.operator_url,
    )
    agent: AgentClient = agents("acme", "prod", "agent-1")
    state = AgentState()

    assert (await operator.set_desired("acme", "prod", 1, [WEB]))[0] == 202
    _, reply = await agent.poll_commands(20)
    (old,) = [Command.model_validate(c) for c in reply["commands"]]
    assert state.admit(old) is Decision.APPLY

    # A new owner takes the partition (new epoch) and issues the next revision.
    deployment.start_controller("second")
    first.stop()
    assert (await operator.set_desired("acme", "prod", 2, [{**WEB, "version": "3.0.0"}]))[0] == 202

    async def newer() -> list[Command]:
        _, body = await agent.poll_commands(5)
        return [Command.model_validate(c) for c in body["commands"] if c["id"] != old.id]

    (current,) = await eventually(newer, lambda cs: len(cs) == 1, what="next revision's command")
    assert current.epoch > old.epoch
    assert state.admit(current) is Decision.APPLY

    (partition,) = rows(deployment, "SELECT partition FROM commands WHERE id = %s", current.id)[0]
    zombie_row = rows(
        deployment,
        "INSERT INTO commands (customer_id, environment_id, epoch, revision, action, "
        "resource_kind, resource_name, version, partition, attempts, deadline_at) "
        "VALUES ('acme', 'prod', %s, 2, 'create', 'job', 'rogue', '6.6.6', %s, 1, "
        "now() + interval '1 hour') RETURNING id",
        old.epoch,
        partition,
    )
    _, body = await agent.poll_commands(0)
    offered = {c["id"]: Command.model_validate(c) for c in body["commands"]}
    rogue = offered[zombie_row[0][0]]
    assert rogue.epoch < current.epoch
    assert state.admit(rogue) is Decision.STALE_EPOCH
    assert ("job", "rogue") not in state.resources

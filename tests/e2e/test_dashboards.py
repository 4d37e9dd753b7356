"""Every panel query of the Grafana dashboards, run against the native Prometheus.

Real edge, API, gateway_auth and controllers under a steady agent load (and one
request the WAF refuses, and operators' changes that an agent's long polls pick up
as commands), scraped every second by the Prometheus that
``infra/local/observability.sh`` starts, with the real recording rules. Each
query must parse and return at least one finite value: a panel that would stay
empty (a renamed metric, a label that does not exist) fails here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest

from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.invariants import Ledger
from tests.support.load import SteadyLoad
from tests.support.monitoring import Monitoring
from tests.support.operators import OperatorClient
from tests.support.ownership import customers_covering
from tests.support.stack import ROOT
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(240)

DASHBOARDS: Final = sorted((ROOT / "infra/observability/dashboards").glob("*.json"))
# What Grafana substitutes before sending a query: a rate window of a few
# scrapes (1 s here), every partition.
VARIABLES: Final = {"$__rate_interval": "1m", "$partition": ".*", "$customer": ".*"}


def panel_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, PromQL with the variables substituted) of every panel target."""
    found = []
    for panel in json.loads(path.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{path.name}: {panel['title']}: unknown variable in {expr}"
            found.append((f"{path.name}: {panel['title']}", expr))
    return found


def has_a_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def test_the_dashboards_exist_and_have_queries() -> None:
    assert {p.name for p in DASHBOARDS} == {"fleet-overview.json", "controllers.json"}
    for path in DASHBOARDS:
        assert panel_queries(path), path


async def waf_refusal(operator_url: str, pki_dir: Path) -> int:
    """One request the operator listener's WAF refuses (an SQL injection in the query)."""
    context = ssl.create_default_context(cafile=str(pki_dir / "root-ca.pem"))
    context.check_hostname = False
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{operator_url}/v1/operator/customers/c/environments",
            params={"q": "1' OR '1'='1"},
            ssl=context,
        ) as reply,
    ):
        return reply.status


async def command_flow(operator: OperatorClient, agent: AgentClient) -> int:
    """Operator changes, each a new command, picked up by the agent's long polls, until cancelled.

    A poll is open when each change is made, so most commands become due while it
    waits (the delivery SLO's path); the agents keep reporting the old version, so
    each new revision supersedes the last command and the next one is a new offer.
    Returns how many replies carried commands.
    """
    replies = 0
    revision = 0
    while True:
        revision += 1
        poll = asyncio.create_task(agent.poll_commands(10))
        status, body = await operator.set_desired(
            agent.customer_id,
            agent.environment_id,
            revision,
            [{"kind": "statefulset", "name": "db", "version": f"16.{revision}"}],
        )
        assert status == 202, body
        status, reply = await poll
        assert status == 200, reply
        replies += bool(reply["commands"])
        await asyncio.sleep(1)


async def test_every_panel_query_returns_data_from_the_live_prometheus(
    deployment: Deployment,
    monitoring: Monitoring,
    agents: Callable[[str, str, str], AgentClient],
) -> None:
    deployment.start_apis()
    deployment.start_controller("c1")
    deployment.start_controller("c2")
    stack = deployment.fleet.stack
    queries = [q for path in DASHBOARDS for q in panel_queries(path)]
    fleet = [agents(c, "prod", "agent-1") for c in customers_covering(deployment.fleet.partitions)]

    async def empty_panels() -> list[str]:
        empty = []
        for title, expr in queries:
            # A query that does not parse fails here at once (Monitoring.query raises).
            if not has_a_finite_value(await monitoring.query(expr)):
                empty.append(f"{title}: {expr}")
        return empty

    # A second agent of the first environment takes its commands: agent-1 keeps the load.
    commander = agents(fleet[0].customer_id, fleet[0].environment_id, "agent-2")
    operator = OperatorClient(
        stack.pki_dir, deployment.operator_key(fleet[0].customer_id), stack.operator_url
    )
    async with SteadyLoad(fleet, Ledger(), pause_s=0.2):
        commands = asyncio.create_task(command_flow(operator, commander))
        assert await waf_refusal(stack.operator_url, stack.pki_dir) == 403
        try:
            await eventually(
                empty_panels,
                lambda e: e == [],
                timeout_s=90,
                interval_s=2,
                what="every panel has data",
            )
        finally:
            commands.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await commands
        # Database pool use from all three services, told apart by the scrape job.
        jobs = await monitoring.query(
            'count by (job) (fleetplane_database_pool_connections{state="max"})'
        )
        assert {s["metric"]["job"] for s in jobs} == {
            "fleetplane-api",
            "fleetplane-gateway-auth",
            "fleetplane-controller",
        }
        # The customer drill-down counts each environment once across the two
        # controllers: each customer has exactly one exporter, its partition's owner.
        await eventually(
            lambda: monitoring.value("sum(fleetplane_environments)"),
            lambda v: v == len(fleet),
            timeout_s=30,
            what="every environment counted once",
        )
        assert (
            await monitoring.query("count by (customer, liveness) (fleetplane_environments) > 1")
            == []
        )
    print(f"{len(queries)} panel queries, each with data")

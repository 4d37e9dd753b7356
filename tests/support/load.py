"""Steady agent traffic for tests, and waiting until all of it is applied."""

from __future__ import annotations

import asyncio

import psycopg

from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.invariants import Ledger
from tests.support.waiting import eventually


async def send_steadily(
    agent: AgentClient, ledger: Ledger, batches: int, size: int, pause_s: float = 0.0
) -> None:
    for _ in range(batches):
        events = [agent.heartbeat() for _ in range(size - 1)]
        events.append(agent.observed([{"name": "db", "kind": "statefulset", "version": "15.4"}]))
        while True:
            status, body = await agent.post_events(events)
            if status == 202:
                ledger.record(agent.customer_id, agent.environment_id, agent.agent_id, events)
                break
            assert status == 503, body  # back-pressure: retry the same batch
            await asyncio.sleep(0.2)
        if pause_s:
            await asyncio.sleep(pause_s)


async def wait_all_applied(deployment: Deployment, ledger: Ledger, timeout_s: float = 60) -> None:
    dsn = deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)

    async def recorded() -> int:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT count(*) FROM event_records").fetchone()
        return int(row[0]) if row else 0

    await eventually(recorded, lambda n: n >= len(ledger), timeout_s=timeout_s, what="all applied")

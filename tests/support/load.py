"""Steady agent traffic for tests, and waiting until all of it is applied."""

from __future__ import annotations

import asyncio

import aiohttp
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


class SteadyLoad:
    """Agents sending batches back to back until ``stop``: load for as long as a scenario runs.

    Every batch answered 202 goes into ``ledger``; a 503 (back-pressure) is retried
    with the same events, as a real agent does.
    """

    def __init__(
        self, agents: list[AgentClient], ledger: Ledger, *, size: int = 5, pause_s: float = 0.05
    ) -> None:
        self.agents = agents
        self.ledger = ledger
        self.size = size
        self.pause_s = pause_s
        self.batches = 0
        self.refusals = 0
        """Answers 503 (back-pressure) or 429 (rate limit), retried."""
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> SteadyLoad:
        self._tasks = [asyncio.create_task(self._run(a)) for a in self.agents]
        return self

    async def _run(self, agent: AgentClient) -> None:
        while not self._stopping.is_set():
            events = [agent.heartbeat() for _ in range(self.size - 1)]
            events.append(
                agent.observed([{"name": "db", "kind": "statefulset", "version": "15.4"}])
            )
            while True:
                try:
                    status, body = await agent.post_events(events)
                except (aiohttp.ClientError, TimeoutError):
                    # The answer was lost, not necessarily the batch: resending the
                    # same event ids is safe (deduplication), as agents do.
                    await asyncio.sleep(0.2)
                    continue
                if status == 202:
                    self.ledger.record(
                        agent.customer_id, agent.environment_id, agent.agent_id, events
                    )
                    break
                # Back-pressure (503) or the edge's per-agent rate limit (429, which a
                # fast steady load on an idle machine can reach): retry the same
                # batch later, as agents do.
                assert status in (429, 503), body
                self.refusals += 1
                await asyncio.sleep(0.2 if status == 503 else 1.0)
            self.batches += 1
            await asyncio.sleep(self.pause_s)

    async def stop(self) -> None:
        """Finish the batches in flight (their retries included) and stop."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    async def __aenter__(self) -> SteadyLoad:
        return self.start()

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.stop()
            return
        # The scenario failed: a batch might be retried forever against a broken deployment.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

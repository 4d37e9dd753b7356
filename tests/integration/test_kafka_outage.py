"""Invariant 2: accepted means durable; Kafka down is a fast 503, and retries are safe.

Stops and restarts the stack's real Kafka broker.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.invariants import Ledger, check
from tests.support.load import wait_all_applied
from tests.support.stack import ROOT

AgentFactory = Any


def kafka(action: str) -> None:
    subprocess.run(["bash", str(ROOT / "infra/local/kafka.sh"), action], check=True, timeout=120)


def readyz_status(deployment: Deployment, port: int) -> int:
    try:
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}/readyz", timeout=5, context=deployment.api_ssl_context()
        ) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as e:
        return e.code


async def test_kafka_outage_is_503_fast_and_retried_batches_apply_exactly_once(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    deployment.start_controller()
    agent: AgentClient = agents("acme", "prod", "agent-1")
    ledger = Ledger()
    warmup = [agent.heartbeat()]
    assert (await agent.post_events(warmup))[0] == 202
    ledger.record("acme", "prod", "agent-1", warmup)

    kafka("stop")
    refused: list[list[dict[str, Any]]] = []
    try:
        for _ in range(3):
            batch = [agent.heartbeat() for _ in range(5)]
            started = time.monotonic()
            status, body = await agent.post_events(batch)
            elapsed = time.monotonic() - started
            assert status == 503, body
            assert elapsed < 5.0, f"503 took {elapsed:.1f} s"
            assert body["status"] == 503
            refused.append(batch)
        port = deployment.fleet.stack.api_ports[0]
        assert await asyncio.to_thread(readyz_status, deployment, port) == 503
    finally:
        kafka("start")

    # The agent retries each refused batch, unchanged, until it is accepted.
    for batch in refused:
        deadline = time.monotonic() + 60
        while True:
            status, body = await agent.post_events(batch)
            if status == 202:
                ledger.record("acme", "prod", "agent-1", batch)
                break
            assert status == 503, body
            assert time.monotonic() < deadline, "Kafka did not come back"
            await asyncio.sleep(0.5)
    # A second retry of an accepted batch (its 202 lost on the way) is harmless too.
    assert (await agent.post_events(refused[0]))[0] == 202

    await wait_all_applied(deployment, ledger, timeout_s=90)
    report = check(ledger, deployment.fleet.stack.admin_dsn(deployment.fleet.database_name))
    assert report.ok, report
    assert report.recorded == 16

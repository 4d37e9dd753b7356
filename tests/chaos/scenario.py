"""What the chaos tests share: a busy fleet, the end-of-test check, the zombie hook's files."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tests.support import ownership as own
from tests.support.deployment import Deployment
from tests.support.invariants import Ledger, check
from tests.support.load import SteadyLoad, wait_all_applied
from tests.support.waiting import eventually
from tests.support.zombie_controller import PAUSE_FILE_VARIABLE

ZOMBIE = "tests.support.zombie_controller"
"""The controller's module with the zombie hook: ``start_controller(..., module=ZOMBIE)``."""

AgentFactory = Any
"""The ``agents`` fixture: ``agents(customer, environment, agent)`` makes a connected agent."""


def fleet(agents: AgentFactory, partitions: int, per_partition: int = 2) -> list[Any]:
    """One agent per customer, ``per_partition`` customers on every partition."""
    return [agents(c, "prod", "agent-1") for c in own.customers_covering(partitions, per_partition)]


async def finish(deployment: Deployment, load: SteadyLoad, ledger: Ledger) -> None:
    """Stop the load, wait until everything accepted is applied, run the invariant checker."""
    await load.stop()
    await wait_all_applied(deployment, ledger, timeout_s=60)
    report = check(ledger, own.dsn(deployment))
    assert report.ok, report
    assert report.accepted == len(ledger) > 0


async def wait_file(path: Path, timeout_s: float) -> dict[str, Any]:
    """Wait for the JSON file the pause hook writes, and read it."""

    def read_now() -> str | None:
        return path.read_text() if path.exists() else None

    async def read() -> str | None:
        return await asyncio.to_thread(read_now)

    text = await eventually(
        read, lambda t: t is not None, timeout_s=timeout_s, interval_s=0.05, what=f"{path}"
    )
    assert text is not None
    holding: dict[str, Any] = json.loads(text)
    return holding


def zombie_env(pause_file: Path, *, keep_transaction_open: bool = False) -> dict[str, str]:
    """Environment for ``tests.support.zombie_controller`` (start it with ``ZOMBIE``).

    ``keep_transaction_open``: PostgreSQL would otherwise end the stopped
    controller's idle session after 2 s (the default), long before a test wakes it.
    The command timer then waits a minute too: a tick's short transaction, if open
    at the instant of the stop, would hold its share lock on the ownership rows
    (and so the takeover) until that session ends, which is right but not the
    scenario such a test is about.
    """
    env = {PAUSE_FILE_VARIABLE: str(pause_file)}
    if keep_transaction_open:
        env["FLEETPLANE_CONTROLLER_IDLE_IN_TRANSACTION_TIMEOUT_S"] = "120"
        env["FLEETPLANE_CONTROLLER_COMMAND_TIMER_INTERVAL_S"] = "60"
    return env


async def stop_inside_a_transaction(
    deployment: Deployment, name: str, pause_file: Path
) -> dict[int, dict[str, Any]]:
    """Make controller ``name`` (started with ``zombie_env``) stop inside an apply transaction.

    Waits for the load to reach every partition and the group to settle first, so
    the transaction is a current owner's. Returns what it holds, per partition:
    ``epoch`` and the ``event_ids`` written but not committed (some, at least).
    """
    await own.wait_busy(deployment)
    await own.wait_holds(deployment, own.instance_id(deployment, name))
    await own.wait_settled(deployment, deployment.controllers)
    # Arm: the controller's next apply transaction stops itself.
    await asyncio.to_thread(pause_file.touch)
    holding = await wait_file(pause_file.with_name("pause.holding"), timeout_s=15)
    held = {int(p): h for p, h in holding["partitions"].items()}
    assert any(h["event_ids"] for h in held.values()), holding
    return held

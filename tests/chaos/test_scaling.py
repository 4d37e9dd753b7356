"""Scaling the controller group under load: out and in, and a storm of joins and leaves.

Each test ends with the invariant checker.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest

from tests.chaos.scenario import finish, fleet
from tests.support import ownership as own
from tests.support.deployment import Deployment
from tests.support.invariants import Ledger
from tests.support.load import SteadyLoad
from tests.support.processes import ServiceProcess
from tests.support.waiting import eventually

AgentFactory = Any


async def wait_owners(deployment: Deployment, names: list[str], timeout_s: float = 30) -> None:
    """Wait until the partitions are owned by exactly these controllers, each with some."""
    wanted = {own.instance_id(deployment, n) for n in names}
    await eventually(
        lambda: asyncio.to_thread(own.ownership, deployment),
        lambda rows: (
            len(rows) == deployment.fleet.partitions and {r.owner for r in rows.values()} == wanted
        ),
        timeout_s=timeout_s,
        what=f"partitions owned by {sorted(names)}",
    )


@pytest.mark.parametrize("deployment", [6], indirect=True)
async def test_scale_out_and_in_1_3_1(deployment: Deployment, agents: AgentFactory) -> None:
    deployment.start_apis()
    deployment.start_controller("c1")
    ledger = Ledger()
    async with SteadyLoad(fleet(agents, 6, per_partition=1), ledger) as load:
        await own.wait_busy(deployment)
        started = time.monotonic()
        deployment.start_controller("c2", wait_ready=False)
        deployment.start_controller("c3", wait_ready=False)
        await wait_owners(deployment, ["c1", "c2", "c3"])
        print(f"1 -> 3: work shared {time.monotonic() - started:.2f} s after starting two more")
        before = own.ownership(deployment)
        await own.wait_applied_after(deployment, before)  # all three apply

        started = time.monotonic()
        codes = await asyncio.gather(
            asyncio.to_thread(deployment.controllers["c2"].stop),
            asyncio.to_thread(deployment.controllers["c3"].stop),
        )
        assert list(codes) == [0, 0]
        await wait_owners(deployment, ["c1"])
        print(f"3 -> 1: c1 owns everything {time.monotonic() - started:.2f} s after SIGTERM")
        await own.wait_applied_after(deployment, own.ownership(deployment))
        await finish(deployment, load, ledger)


def joined(process: ServiceProcess) -> bool:
    return "Joined group" in process.log_text()


async def test_rebalance_storm_of_joins_and_leaves(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    anchor = deployment.start_controller("anchor")
    ledger = Ledger()
    async with SteadyLoad(fleet(agents, 4), ledger) as load:
        await own.wait_busy(deployment)
        rebalances_before = own.metric(anchor, "fleetplane_controller_rebalances_total")
        # Six joins and six leaves within 30 s, half of the leaves SIGTERM and half
        # kill -9: each member leaves as soon as it has joined, while the next two
        # join, so the group rarely settles.
        members = [f"s{i}" for i in range(1, 7)]
        stopping: list[asyncio.Task[int | None]] = []
        started = time.monotonic()
        ahead = 2  # members starting while the current one leaves
        for name in members[:ahead]:
            deployment.start_controller(name, wait=False)
        for i, name in enumerate(members):
            if i + ahead < len(members):
                deployment.start_controller(members[i + ahead], wait=False)
            member = deployment.controllers[name]
            # A leave counts only for a member that had joined.
            await eventually(
                lambda m=member: asyncio.to_thread(joined, m),  # type: ignore[misc]
                bool,
                timeout_s=15,
                what=f"{name} joined",
            )
            if i % 2:
                own.kill9(member)
            else:
                stopping.append(asyncio.create_task(asyncio.to_thread(member.stop)))
        storm_s = time.monotonic() - started
        print(f"storm: 6 joins and 6 leaves in {storm_s:.1f} s")
        assert storm_s <= 30
        assert await asyncio.gather(*stopping) == [0, 0, 0]

        await wait_owners(deployment, ["anchor"], timeout_s=30)
        rebalances = own.metric(anchor, "fleetplane_controller_rebalances_total")
        print(f"anchor saw {rebalances - rebalances_before:.0f} assignments during the storm")
        assert rebalances - rebalances_before >= 3
        await own.wait_applied_after(deployment, own.ownership(deployment))
        await finish(deployment, load, ledger)
    assert anchor.alive()
    assert not re.search(r"CRITICAL|crash", anchor.log_text(), re.IGNORECASE)

"""The events topic's partitions: adding some (drain-then-add), and records Kafka deleted.

Adding partitions moves customers to other partitions; the procedure of
docs/runbooks/partitions.md keeps each customer's events in order, and the
negative test shows the invariant checker catching the disorder when its drain
step is skipped. A partition whose next record Kafka already deleted is refused,
never skipped.
"""

from __future__ import annotations

import asyncio
import sys
import time

import psycopg
import pytest

from services.controller.partitions import intake_paused
from services.shared.topics import add_partitions
from tests.chaos.scenario import AgentFactory, finish
from tests.support import ownership as own
from tests.support.deployment import Deployment
from tests.support.invariants import Ledger, check
from tests.support.load import SteadyLoad, send_steadily, wait_all_applied
from tests.support.stack import ROOT
from tests.support.waiting import eventually


def moving(customers: list[str], before: int, after: int) -> list[str]:
    return [c for c in customers if own.partition_for(c, before) != own.partition_for(c, after)]


def partitions_by_customer(deployment: Deployment) -> dict[str, set[int]]:
    with psycopg.connect(own.dsn(deployment)) as conn:
        rows = conn.execute("SELECT DISTINCT customer_id, partition FROM event_records").fetchall()
    found: dict[str, set[int]] = {}
    for customer, partition in rows:
        found.setdefault(customer, set()).add(int(partition))
    return found


@pytest.mark.parametrize("deployment", [4], indirect=True)
async def test_adding_partitions_by_the_runbook_under_load_keeps_every_customer_in_order(
    deployment: Deployment, agents: AgentFactory
) -> None:
    # The API refreshes its producer's metadata every 3 s instead of 10 (the tool
    # is told the same), only to keep the test short.
    metadata_age_s = "3"
    deployment.start_apis({"FLEETPLANE_API_PRODUCER_METADATA_MAX_AGE_S": metadata_age_s})
    deployment.start_controller("c1")
    deployment.start_controller("c2")
    # Busy old partitions, and customers that will move to each new partition.
    customers = own.customers_covering(4, per_partition=2)
    customers += [
        next(c for c in (f"to-{p}-{i}" for i in range(1000)) if own.partition_for(c, 6) == p)
        for p in (4, 5)
    ]
    assert len(moving(customers, 4, 6)) >= 4  # the scenario is about customers moving
    ledger = Ledger()
    async with SteadyLoad([agents(c, "prod", "agent-1") for c in customers], ledger) as load:
        await own.wait_busy(deployment)
        started = time.monotonic()
        tool = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.controller.partitions",
            "add",
            "--to",
            "6",
            "--producer-metadata-max-age-s",
            metadata_age_s,
            "--drain-timeout-s",
            "60",
            cwd=ROOT,
            env=deployment.fleet.service_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(tool.communicate(), 120)
        text = output.decode()
        print(f"drain-then-add took {time.monotonic() - started:.1f} s:\n{text}")
        assert tool.returncode == 0, text
        assert "now has 6 partitions" in text
        assert "FLEETPLANE_TOPIC_PARTITIONS=6" in text
        assert not await intake_paused(
            deployment.fleet.stack.kafka_bootstrap, deployment.fleet.events_topic
        )
        # Intake was really paused: agents were answered 503 and retried.
        assert load.refusals > 0
        # The controllers take the new partitions on and apply there.
        await eventually(
            lambda: asyncio.to_thread(own.ownership, deployment),
            lambda rows: {4, 5} <= set(rows) and all(rows[p].next_offset > 0 for p in (4, 5)),
            timeout_s=30,
            what="the new partitions applying",
        )
        await asyncio.sleep(2)
        await finish(deployment, load, ledger)
    where = partitions_by_customer(deployment)
    for customer in customers:
        old, new = own.partition_for(customer, 4), own.partition_for(customer, 6)
        assert where[customer] == {old, new}, customer


@pytest.mark.parametrize("deployment", [4], indirect=True)
async def test_skipping_the_drain_lets_newer_events_apply_first_and_the_checker_says_so(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis({"FLEETPLANE_API_PRODUCER_METADATA_MAX_AGE_S": "1"})
    # Small batches, so a backlog takes many transactions to apply.
    small_batches = {"FLEETPLANE_CONTROLLER_BATCH_MAX_RECORDS": "10"}
    first = deployment.start_controller("first", extra_env=small_batches)
    # The customer that moves, to a partition numbered below its old one (batches
    # apply partitions in ascending order, so even sharing a batch the new events
    # go first), and a customer that stays on that old partition.
    mover = next(
        c
        for c in (f"mover-{i}" for i in range(1000))
        if own.partition_for(c, 6) < own.partition_for(c, 4)
    )
    old, new = own.partition_for(mover, 4), own.partition_for(mover, 6)
    stayer = next(
        c
        for c in (f"stayer-{i}" for i in range(1000))
        if own.partition_for(c, 4) == old == own.partition_for(c, 6)
    )
    moving_agent, staying_agent = agents(mover, "prod", "a1"), agents(stayer, "prod", "a1")
    ledger = Ledger()
    await send_steadily(moving_agent, ledger, batches=2, size=5)
    await wait_all_applied(deployment, ledger)

    # The controllers are stopped; accepted events wait in the old partition,
    # behind a backlog of another customer's.
    assert first.stop() == 0
    await send_steadily(staying_agent, ledger, batches=30, size=10)
    await send_steadily(moving_agent, ledger, batches=2, size=5)
    # Partitions added without pausing intake or draining: the mistake.
    await add_partitions(deployment.fleet.stack.kafka_bootstrap, deployment.fleet.events_topic, 6)
    # Each API's producer refreshes its metadata every second (above) and the edge
    # spreads requests over the APIs in turn: single events landing in the new
    # partition several times in a row mean every API learned of it.
    in_a_row = 0

    async def one_event_lands_in_the_new_partition() -> int:
        nonlocal in_a_row
        before = await own.log_end_offsets(deployment)
        await send_steadily(moving_agent, ledger, batches=1, size=1)
        landed = (await own.log_end_offsets(deployment))[new] > before[new]
        in_a_row = in_a_row + 1 if landed else 0
        return in_a_row

    await eventually(
        one_event_lands_in_the_new_partition,
        lambda n: n >= 4,
        timeout_s=60,
        what="every API's producer sends to the new partition",
    )
    before = await own.log_end_offsets(deployment)
    await send_steadily(moving_agent, ledger, batches=1, size=5)
    after = await own.log_end_offsets(deployment)
    assert after[new] - before[new] == 5, "the newer events must land in the new partition"

    deployment.start_controller("second", extra_env=small_batches)
    await wait_all_applied(deployment, ledger)
    assert partitions_by_customer(deployment)[mover] == {old, new}
    report = check(ledger, own.dsn(deployment))
    assert not report.lost
    assert not report.duplicated
    assert report.out_of_order, report
    assert all(mover in line for line in report.out_of_order), report.out_of_order
    print(f"the checker found {len(report.out_of_order)} out of order, e.g.:")
    print("\n".join(report.out_of_order[:3]))


@pytest.mark.parametrize("deployment", [2], indirect=True)
async def test_a_partition_whose_stored_offset_is_below_the_log_start_is_refused_with_the_reason(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    controller = deployment.start_controller("first")
    [kept, lost] = own.customers_covering(2, per_partition=1)  # partitions 0 and 1
    kept_agent, lost_agent = agents(kept, "prod", "a1"), agents(lost, "prod", "a1")
    ledger = Ledger()
    await send_steadily(kept_agent, ledger, batches=3, size=5)
    await send_steadily(lost_agent, ledger, batches=3, size=5)
    await wait_all_applied(deployment, ledger)

    # While no controller runs, partition 1 gets records that Kafka then deletes
    # unapplied (as retention does to a partition left behind too long).
    assert controller.stop() == 0
    stored = own.ownership(deployment)[1].next_offset
    deleted = Ledger()
    await send_steadily(lost_agent, deleted, batches=2, size=5)
    log_start = await own.delete_records(deployment, 1, (await own.log_end_offsets(deployment))[1])
    assert log_start > stored
    await send_steadily(kept_agent, ledger, batches=2, size=5)

    restarted = deployment.start_controller("restarted")
    await wait_all_applied(deployment, ledger)  # partition 0 is applied as usual
    body = own.readyz(restarted)
    assert "1" not in body["partitions"]
    assert "0" in body["partitions"]
    reason = body["refused"]["1"]
    assert f"stored offset {stored}" in reason, reason
    assert f"below the log start {log_start}" in reason, reason
    assert own.metric(restarted, "fleetplane_controller_refused_partitions") == 1
    assert "refusing partition" in restarted.log_text()
    # Nothing was skipped: the stored offset did not move past the gap.
    assert own.ownership(deployment)[1].next_offset == stored

    # Refused while running too: records deleted under a controller that still owns
    # the partition (stopped for less than its session timeout, so it keeps it).
    held = own.ownership(deployment)[0].next_offset
    maybe_applied, after_gap = Ledger(), Ledger()
    restarted.pause()
    try:
        # This batch may still reach the stopped controller through the fetch it
        # had waiting at the broker; the next one cannot.
        await send_steadily(kept_agent, maybe_applied, batches=1, size=5)
        await send_steadily(kept_agent, deleted, batches=1, size=5)
        await own.delete_records(deployment, 0, (await own.log_end_offsets(deployment))[0])
    finally:
        restarted.resume()
    await send_steadily(kept_agent, after_gap, batches=1, size=5)  # a record past the gap
    body = await eventually(
        lambda: asyncio.to_thread(own.readyz, restarted),
        lambda b: "0" in b["refused"],
        timeout_s=20,
        what="partition 0 refused",
    )
    gap_at = own.ownership(deployment)[0].next_offset
    assert gap_at in (held, held + 5)
    assert f"stored offset {gap_at}" in body["refused"]["0"]
    assert own.metric(restarted, "fleetplane_controller_refused_partitions") == 2
    await asyncio.sleep(1)
    assert own.ownership(deployment)[0].next_offset == gap_at  # nothing skipped

    # The checker sees the deleted events (and those behind the gap) as lost, and
    # nothing else wrong.
    everything = Ledger(
        ledger.accepted + maybe_applied.accepted + deleted.accepted + after_gap.accepted
    )
    report = check(everything, own.dsn(deployment))

    def ids(*ledgers: Ledger) -> set[tuple[str, str, str, str]]:
        return {entry[:4] for one in ledgers for entry in one.accepted}

    assert ids(deleted, after_gap) <= set(report.lost) <= ids(deleted, after_gap, maybe_applied)
    assert not report.duplicated
    assert not report.out_of_order

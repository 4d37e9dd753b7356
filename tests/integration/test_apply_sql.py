"""The apply transaction's SQL on the real PostgreSQL: its statement count and its arrays."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, select

from services.controller.handlers import AgentState, Decoded, Delivered, Plan, decode
from services.controller.ownership import take_epoch
from services.controller.store import BatchPart, apply_batch, write_plan
from services.shared.db import create_engine
from services.shared.schema import agent_status, event_records
from tests.support.deployment import Deployment
from tests.support.records import encode, heartbeat_record

pytestmark = pytest.mark.timeout(60)


def heartbeats(partition: int, customer: str, count: int) -> list[Decoded]:
    out = []
    for seq in range(1, count + 1):
        record = heartbeat_record(customer, f"{customer}-{seq}", seq)
        decoded = decode(Delivered(partition, seq - 1, customer.encode(), encode(record)))
        assert isinstance(decoded, Decoded)
        out.append(decoded)
    return out


async def test_a_batch_is_the_same_number_of_statements_over_one_or_four_partitions(
    deployment: Deployment,
) -> None:
    engine = create_engine(deployment.fleet.database, application_name="apply sql test")
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    try:
        async with engine.begin() as conn:
            claims = [
                await take_epoch(conn, deployment.fleet.events_topic, p, "test") for p in range(4)
            ]
        event.listen(engine.sync_engine, "before_cursor_execute", count)
        shapes = {
            "one partition": [BatchPart(claims[0], heartbeats(0, "solo", 12), 12)],
            "four partitions": [
                BatchPart(claims[p], heartbeats(p, f"cust-{p}", 3), 3) for p in range(4)
            ],
        }
        counted = {}
        for shape, parts in shapes.items():
            statements.clear()
            async with engine.begin() as conn:
                plan = await apply_batch(conn, parts, ack_timeout_s=30.0)
            assert len(plan.outcomes) == 12
            counted[shape] = len(statements)
        # Two loads (recorded events, agents), three writes (events, agents,
        # environments) and the fence, however the twelve records are spread.
        assert counted == {"one partition": 6, "four partitions": 6}
        async with engine.connect() as conn:
            rows = (await conn.execute(select(event_records.c.partition))).all()
        assert sorted(r.partition for r in rows) == [0] * 15 + [1] * 3 + [2] * 3 + [3] * 3
    finally:
        await engine.dispose()


async def test_an_agents_earlier_boots_survive_the_trip_through_unnest(
    deployment: Deployment,
) -> None:
    engine = create_engine(deployment.fleet.database, application_name="apply sql test")
    # Each one needs quoting in PostgreSQL's text form of an array.
    boots = ('with "quotes"', "back\\slash", "{braces,comma}", "NULL", "", " spaced ")
    now = datetime.now(UTC)
    plan = Plan()
    plan.agents[("c", "e", "a")] = AgentState("boot-9", 1, now, previous_boots=boots)
    plan.agents[("c", "e", "b")] = AgentState("boot-1", 1, now)
    try:
        async with engine.begin() as conn:
            await write_plan(conn, plan, {})
        async with engine.connect() as conn:
            stored = {
                r.agent_id: tuple(r.previous_boots)
                for r in await conn.execute(
                    select(agent_status.c.agent_id, agent_status.c.previous_boots)
                )
            }
        assert stored == {"a": boots, "b": ()}
    finally:
        await engine.dispose()

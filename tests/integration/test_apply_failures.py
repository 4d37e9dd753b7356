"""Every accepted record ends applied or dead-lettered, and the partition keeps moving.

On real Kafka and PostgreSQL with a running controller: a record the database
refuses is isolated from its batch and dead-lettered with the SQLSTATE while the
rest of the batch (several partitions, several customers) is applied once, in
order; a database that cannot take writes is back-pressure, dead-letters nothing,
shows as a stall, and applying resumes when it is lifted.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.request
from collections import defaultdict

import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from psycopg import sql

from services.controller.dead_letters import DeadLetter, read_dead_letters
from tests.support.deployment import Deployment
from tests.support.processes import ServiceProcess
from tests.support.records import REFUSE_MARKED, encode, heartbeat_record
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(180)

CUSTOMERS = [f"cust-{i}" for i in range(8)]
REFUSED_EVENT = "refused-cust-3-13"


def dsn(deployment: Deployment) -> str:
    return deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)


async def produce(deployment: Deployment, seqs: range) -> dict[tuple[str, int], tuple[int, int]]:
    """Heartbeats ``seqs`` of every customer, interleaved.

    Returns (customer, seq) -> (partition, offset).
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=deployment.fleet.stack.kafka_bootstrap, acks="all", linger_ms=5
    )
    await producer.start()
    try:
        pending = {}
        for seq in seqs:
            for customer in CUSTOMERS:
                event_id = (
                    REFUSED_EVENT if (customer, seq) == ("cust-3", 13) else f"{customer}-{seq}"
                )
                value = encode(heartbeat_record(customer, event_id, seq))
                pending[(customer, seq)] = await producer.send(
                    deployment.fleet.events_topic, value, key=customer.encode()
                )
        return {k: (m.partition, m.offset) for k, m in [(k, await f) for k, f in pending.items()]}
    finally:
        await producer.stop()


def applied(deployment: Deployment) -> list[tuple[str, str, int, int, str]]:
    """(customer, event id, partition, offset, status) of every event record, in apply order."""
    with psycopg.connect(dsn(deployment)) as conn:
        rows = conn.execute(
            'SELECT customer_id, event_id, partition, "offset", status FROM event_records '
            'ORDER BY partition, "offset"'
        ).fetchall()
    return [(c, e, int(p), int(o), s) for c, e, p, o, s in rows]


def stored_offsets(deployment: Deployment) -> dict[int, int]:
    with psycopg.connect(dsn(deployment)) as conn:
        rows = conn.execute("SELECT partition, next_offset FROM partition_ownership").fetchall()
    return {int(p): int(o) for p, o in rows}


def log_ends(positions: dict[tuple[str, int], tuple[int, int]]) -> dict[int, int]:
    ends: dict[int, int] = defaultdict(int)
    for partition, offset in positions.values():
        ends[partition] = max(ends[partition], offset + 1)
    return dict(ends)


async def dead_letters(deployment: Deployment) -> list[DeadLetter]:
    return await read_dead_letters(
        deployment.fleet.stack.kafka_bootstrap, deployment.fleet.dead_letter_topic, timeout_s=10
    )


def gauge(controller: ServiceProcess, name: str) -> dict[int, float]:
    url = controller.health_url.replace("/healthz", "/metrics")
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    pattern = rf'^{name}\{{partition="(\d+)"\}} (\S+)$'
    return {int(p): float(v) for p, v in re.findall(pattern, text, re.M)}


async def test_a_record_the_database_refuses_is_dead_lettered_and_the_rest_applied_in_order(
    deployment: Deployment,
) -> None:
    with psycopg.connect(dsn(deployment)) as conn:
        conn.execute(REFUSE_MARKED)
    # Everything is on the topic before the controller starts, so its first
    # batches span every partition and customer with the refused record inside.
    positions = await produce(deployment, range(1, 26))
    assert len({p for p, _ in positions.values()}) > 1
    controller = deployment.start_controller()
    ends = log_ends(positions)

    await eventually(
        lambda: asyncio.to_thread(stored_offsets, deployment),
        lambda stored: all(stored.get(p) == end for p, end in ends.items()),
        timeout_s=60,
        what="every partition applied to its log end (lag 0)",
    )
    letters = await eventually(
        lambda: dead_letters(deployment), lambda found: len(found) >= 1, what="the dead letter"
    )
    assert len(letters) == 1, [(d.reason, d.detail) for d in letters]
    letter = letters[0]
    refused_at = positions[("cust-3", 13)]
    assert (letter.reason, letter.sqlstate) == ("database_refused", "22023")
    assert REFUSED_EVENT in letter.detail
    assert letter.detail.startswith("InvalidParameterValue: value refused for")
    assert (letter.source_partition, letter.source_offset) == refused_at
    assert letter.key == b"cust-3"

    rows = applied(deployment)
    expected = {f"{c}-{s}" for c in CUSTOMERS for s in range(1, 26)} - {"cust-3-13"}
    event_ids = [event_id for _, event_id, _, _, _ in rows]
    assert sorted(event_ids) == sorted(expected)  # each applied exactly once, none lost
    for _, event_id, partition, offset, _ in rows:
        customer, seq = event_id.rsplit("-", 1)
        assert positions[(customer, int(seq))] == (partition, offset)  # recorded where consumed
    # In order: per customer, sequence numbers rise in offset order.
    by_customer: dict[str, list[int]] = defaultdict(list)
    for customer, event_id, _, _, _ in rows:
        by_customer[customer].append(int(event_id.rsplit("-", 1)[1]))
    assert all(seqs == sorted(seqs) for seqs in by_customer.values())
    # The refused heartbeat left a gap in cust-3's sequence: applied, with a resync asked.
    assert {status for *_, status in rows} == {"applied"}

    assert controller.alive()
    log = controller.log_text().lower()
    assert "crash" not in log, controller.tail()
    assert "dead-lettered" in log
    isolated = re.search(r"refused a batch of (\d+) records over (\d+) partition", log)
    assert isolated is not None, controller.tail()
    assert int(isolated[2]) > 1  # the refused record shared its batch with other partitions


def set_read_only(deployment: Deployment, *, on: bool) -> None:
    """Make every new session of the test database read-only (or not), and end the old ones."""
    database = deployment.fleet.database_name
    change = (
        "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
    )
    # From another database: a session of the test database would be read-only itself.
    with psycopg.connect(deployment.fleet.stack.admin_dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} " + change).format(sql.Identifier(database)))
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (database,),
        )


async def test_a_database_that_cannot_write_holds_records_back_and_dead_letters_nothing(
    deployment: Deployment,
) -> None:
    controller = deployment.start_controller(
        extra_env={"FLEETPLANE_CONTROLLER_STALL_WARNING_S": "2"}
    )
    first = await produce(deployment, range(1, 2))
    await eventually(
        lambda: asyncio.to_thread(stored_offsets, deployment),
        lambda stored: all(stored.get(p) == end for p, end in log_ends(first).items()),
        what="the first heartbeats applied",
    )
    # What a failover to a standby looks like to the controller: every write refused
    # with SQLSTATE 25006, on every new session.
    set_read_only(deployment, on=True)
    held_back = await produce(deployment, range(2, 6))
    waiting = {p for p, _ in held_back.values()}
    ages = await eventually(
        lambda: asyncio.to_thread(
            gauge, controller, "fleetplane_controller_oldest_pending_age_seconds"
        ),
        lambda found: all(found.get(p, 0) >= 3 for p in waiting),
        timeout_s=30,
        what="the stall gauge rising on the held-back partitions",
    )
    assert all(ages[p] >= 3 for p in waiting)
    assert "has not advanced" in controller.log_text()
    status = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.controller", "status", "--json"],
        env=deployment.fleet.service_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pending = {p["partition"]: p["pending_age_s"] for p in json.loads(status.stdout)["partitions"]}
    assert all(pending[p] >= 3 for p in waiting), pending
    assert {e for _, e, *_ in applied(deployment)} == {f"{c}-1" for c in CUSTOMERS}
    assert await dead_letters(deployment) == []

    set_read_only(deployment, on=False)
    ends = log_ends({**first, **held_back})
    await eventually(
        lambda: asyncio.to_thread(stored_offsets, deployment),
        lambda stored: all(stored.get(p) == end for p, end in ends.items()),
        timeout_s=30,
        what="applying resumed once writes are allowed again",
    )
    await eventually(
        lambda: asyncio.to_thread(
            gauge, controller, "fleetplane_controller_oldest_pending_age_seconds"
        ),
        lambda found: bool(found) and all(age == 0 for age in found.values()),
        what="the stall gauge back at 0",
    )
    assert len(applied(deployment)) == len(CUSTOMERS) * 5
    assert await dead_letters(deployment) == []
    assert controller.alive()
    assert "crash" not in controller.log_text().lower()

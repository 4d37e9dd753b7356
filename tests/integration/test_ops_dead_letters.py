"""Dead-letter inspect and replay, on real Kafka with a real controller applying."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.controller.dead_letters import REPLAY_EDITED_HEADER, REPLAY_OF_HEADER
from tests.support.deployment import Deployment
from tests.support.records import encode, heartbeat_record
from tests.support.stack import ROOT
from tests.support.waiting import eventually


def tool(deployment: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m services.controller ...`` with the deployment's settings."""
    return subprocess.run(
        [sys.executable, "-m", "services.controller", *args],
        cwd=ROOT,
        env=deployment.fleet.service_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def produce(deployment: Deployment, values: list[bytes]) -> list[tuple[int, int]]:
    producer = AIOKafkaProducer(
        bootstrap_servers=deployment.fleet.stack.kafka_bootstrap, acks="all"
    )
    await producer.start()
    try:
        sent = []
        for value in values:
            meta = await producer.send_and_wait(deployment.fleet.events_topic, value, key=b"acme")
            sent.append((meta.partition, meta.offset))
        return sent
    finally:
        await producer.stop()


def recorded(dsn: str) -> dict[str, tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        found = conn.execute("SELECT event_id, agent_id, status FROM event_records").fetchall()
    return {e: (a, s) for e, a, s in found}


def stored_offset(dsn: str, partition: int) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT next_offset FROM partition_ownership WHERE partition = %s", (partition,)
        ).fetchone()
    return -1 if row is None else int(row[0])


async def records_at(
    deployment: Deployment, partition: int, start: int
) -> list[tuple[bytes | None, dict[str, bytes]]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=deployment.fleet.stack.kafka_bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(deployment.fleet.events_topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        batch = await consumer.getmany(tp, timeout_ms=5000)
        return [(r.key, {k: bytes(v) for k, v in r.headers}) for r in batch.get(tp, [])]
    finally:
        await consumer.stop()


async def test_a_poison_record_is_inspected_then_replayed_fixed_and_applied(
    deployment: Deployment, tmp_path: Path
) -> None:
    deployment.start_controller()
    dsn = deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)
    broken = heartbeat_record("acme", "ev-broken", 1, agent="agent-2")
    broken["event"]["payload"]["agent_version"] = "1.0"  # the API would refuse it
    sent = await produce(
        deployment,
        [
            encode(heartbeat_record("acme", "ev-1", 1)),
            encode(broken),
            b"not json \x00",
            encode(heartbeat_record("acme", "ev-2", 2)),
        ],
    )
    await eventually(
        lambda: asyncio.to_thread(recorded, dsn),
        lambda r: {"ev-1", "ev-2"} <= r.keys(),
        what="the valid records applied around the poison",
    )

    inspected = tool(deployment, "dead-letters", "inspect", "--json")
    assert inspected.returncode == 0, inspected.stderr
    letters = [json.loads(line) for line in inspected.stdout.splitlines()]
    assert [(d["reason"], d["source_partition"], d["source_offset"]) for d in letters] == [
        ("invalid", *sent[1]),
        ("undecodable", *sent[2]),
    ]
    assert "agent_version" in letters[0]["detail"]
    assert letters[0]["key"] == "acme"
    assert letters[0]["value_preview"].startswith('{"schema_version": 1, "kind": "agent_event"')
    assert letters[1]["value_preview"] == "not json \\x00"
    text = tool(deployment, "dead-letters", "inspect")
    assert "undecodable" in text.stdout
    assert "2 dead letter(s)" in text.stdout

    # Nothing was fixed yet: replaying only what would apply replays nothing.
    partition, end_before = sent[-1][0], sent[-1][1] + 1
    skipped = tool(deployment, "dead-letters", "replay", "--all", "--only-valid", "--json")
    assert skipped.returncode == 0, skipped.stderr
    assert [json.loads(line)["action"] for line in skipped.stdout.splitlines()] == [
        "skipped",
        "skipped",
    ]
    assert await records_at(deployment, partition, end_before) == []

    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({**broken, "event": {**broken["event"], "payload": {
        "agent_version": "1.0.0", "health": "ok"}}}))  # fmt: skip
    dlq_offset = str(letters[0]["offset"])
    for _ in range(2):  # replaying twice is safe: the event id is recorded once
        replayed = tool(
            deployment, "dead-letters", "replay", "--offset", dlq_offset,
            "--value-file", str(fixed), "--only-valid",
        )  # fmt: skip
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed (valid)" in replayed.stdout

    await eventually(
        lambda: asyncio.to_thread(recorded, dsn),
        lambda r: "ev-broken" in r,
        what="the fixed copy applied",
    )
    copies = await records_at(deployment, partition, end_before)
    assert len(copies) == 2
    for key, headers in copies:
        assert key == b"acme"
        assert (
            headers[REPLAY_OF_HEADER]
            == f"{deployment.fleet.dead_letter_topic}/0/{dlq_offset}".encode()
        )
        assert headers[REPLAY_EDITED_HEADER] == b"1"
    await eventually(
        lambda: asyncio.to_thread(stored_offset, dsn, partition),
        lambda offset: offset == end_before + 2,
        what="both copies consumed",
    )
    assert recorded(dsn) == {
        "ev-1": ("agent-1", "applied"),
        "ev-2": ("agent-1", "applied"),
        "ev-broken": ("agent-2", "applied"),
    }
    # The undecodable one is still only a dead letter; nothing else was dead-lettered.
    after = tool(deployment, "dead-letters", "inspect", "--json")
    assert len(after.stdout.splitlines()) == 2


async def test_replaying_a_missing_offset_says_so(deployment: Deployment) -> None:
    result = tool(deployment, "dead-letters", "replay", "--offset", "7")
    assert result.returncode == 1
    assert "0:7  not found" in result.stderr

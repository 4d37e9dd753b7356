"""Invariant 6: bad input gets a clear 4xx and nothing of it is produced or applied."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.waiting import eventually

AgentFactory = Any


async def topic_end_offsets(deployment: Deployment) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=deployment.fleet.stack.kafka_bootstrap)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(deployment.fleet.events_topic, p)
            for p in range(deployment.fleet.partitions)
        ]
        ends = await consumer.end_offsets(partitions)
        return sum(ends.values())
    finally:
        await consumer.stop()


def valid(agent: AgentClient) -> dict[str, Any]:
    return agent.heartbeat()


@pytest.mark.parametrize(
    ("mutate", "status", "field"),
    [
        (lambda e: {**e, "type": "reboot"}, 422, "events[1].type"),
        (lambda e: {**e, "seq": "7"}, 422, "events[1].seq"),
        (lambda e: {**e, "seq": -1}, 422, "events[1].seq"),
        (lambda e: {**e, "id": "has space"}, 422, "events[1].id"),
        (
            lambda e: {**e, "payload": {**e["payload"], "agent_version": "1.0; rm -rf /"}},
            422,
            "events[1].payload.agent_version",
        ),
        (lambda e: {**e, "extra": True}, 422, "events[1].extra"),
    ],
    ids=["unknown-type", "seq-as-string", "negative-seq", "bad-id", "bad-version", "extra-field"],
)
async def test_invalid_event_refuses_the_whole_batch(
    deployment: Deployment, agents: AgentFactory, mutate: Any, status: int, field: str
) -> None:
    deployment.start_apis()
    agent: AgentClient = agents("acme", "prod", "agent-1")
    before = await topic_end_offsets(deployment)
    code, body = await agent.post_events([valid(agent), mutate(valid(agent))])
    assert code == status, body
    assert body["status"] == status
    assert any(field in error["field"] for error in body["errors"]), body
    assert await topic_end_offsets(deployment) == before


async def test_malformed_json_wrong_content_type_oversize(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    agent: AgentClient = agents("acme", "prod", "agent-1")
    before = await topic_end_offsets(deployment)

    code, body, content_type = await agent.post_raw(b'{"events": [')
    assert (code, content_type) == (400, "application/problem+json"), body

    code, body, _ = await agent.post_raw(b'{"events": []}', content_type="text/plain")
    assert code == 415, body

    code, body, _ = await agent.post_raw(json.dumps({"events": []}).encode())
    assert code == 422, body

    too_many = [valid(agent) for _ in range(501)]
    code, body = await agent.post_events(too_many)
    assert code == 422, body

    huge = json.dumps({"events": [valid(agent)], "pad": "x" * (2 * 1024 * 1024)}).encode()
    code, body, content_type = await agent.post_raw(huge)
    assert code == 413, body
    assert content_type == "application/problem+json"

    dup = valid(agent)
    code, body = await agent.post_events([dup, {**dup, "seq": dup["seq"] + 1}])
    assert code == 422, body

    assert await topic_end_offsets(deployment) == before


async def test_poison_on_the_topic_goes_to_dead_letters_and_the_partition_moves_on(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    deployment.start_controller()
    agent: AgentClient = agents("acme", "prod", "agent-1")
    first = valid(agent)
    assert (await agent.post_events([first]))[0] == 202
    await eventually(lambda: agent.event_status(first["id"]), lambda r: r[1]["status"] == "applied")

    producer = AIOKafkaProducer(
        bootstrap_servers=deployment.fleet.stack.kafka_bootstrap, acks="all"
    )
    await producer.start()
    try:
        # Same key as the agent's customer, so the poison sits in the agent's partition.
        for value in (b"not json", b'{"schema_version": 1, "kind": "agent_event"}', b"{}"):
            await producer.send_and_wait(deployment.fleet.events_topic, value, key=b"acme")
    finally:
        await producer.stop()

    after = valid(agent)
    assert (await agent.post_events([after]))[0] == 202
    await eventually(
        lambda: agent.event_status(after["id"]),
        lambda r: r[1]["status"] == "applied",
        what="event after the poison applied",
    )

    consumer = AIOKafkaConsumer(
        deployment.fleet.dead_letter_topic,
        bootstrap_servers=deployment.fleet.stack.kafka_bootstrap,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=5000)
        letters = [m for records in batches.values() for m in records]
    finally:
        await consumer.stop()
    assert len(letters) == 3
    reasons = [dict(m.headers)["fleetplane-dlq-reason"] for m in letters]
    assert reasons == [b"undecodable", b"invalid", b"invalid"]
    assert all(dict(m.headers)["fleetplane-source-offset"] for m in letters)
    with psycopg.connect(deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)) as conn:
        count = conn.execute("SELECT count(*) FROM event_records").fetchone()
    assert count == (2,)

"""Each request's records are a batch of their own: a failed or refused request gives up only
its own records, against the stack's real Kafka broker.

- Kafka refuses one request's batch (the topic's ``max.message.bytes`` is set below it)
  while other requests of the same customer, on the same partition, at the same
  time, are accepted and land;
- a request answered 503 while the broker was stopped does not reach the topic
  once the broker is back.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from services.shared.events import AgentEventRecord, decode_topic_record
from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.stack import ROOT
from tests.support.waiting import eventually

AgentFactory = Any
# A 20-event batch with 1 kB messages is about 25 kB on the topic; a single
# heartbeat a few hundred bytes.
TOPIC_MAX_BYTES = "8192"


async def topic_event_ids(deployment: Deployment) -> list[str]:
    """The event id of every agent-event record on the events topic, read from the start."""
    topic = deployment.fleet.events_topic
    consumer = AIOKafkaConsumer(bootstrap_servers=deployment.fleet.stack.kafka_bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(deployment.fleet.partitions)]
        ends = await consumer.end_offsets(partitions)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ids: list[str] = []

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in partitions])

        while await behind():
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for message in records:
                    assert message.value is not None
                    record = decode_topic_record(message.value)
                    if isinstance(record, AgentEventRecord):
                        ids.append(record.event.id)
        return ids
    finally:
        await consumer.stop()


async def topic_max_bytes(deployment: Deployment, value: str) -> None:
    topic = deployment.fleet.events_topic
    admin = AIOKafkaAdminClient(bootstrap_servers=deployment.fleet.stack.kafka_bootstrap)
    await admin.start()
    try:
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, configs={"max.message.bytes": value})]
        )

        async def current() -> str:
            responses = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})]
            )
            # Each resource: (error code, message, type, name, entries); each entry
            # starts with (name, value).
            return next(
                str(entry[1])
                for response in responses
                for resource in response.resources
                for entry in resource[4]
                if entry[0] == "max.message.bytes"
            )

        await eventually(current, lambda v: v == value, what="the topic's new max.message.bytes")
    finally:
        await admin.close()


@pytest.mark.timeout(120)
async def test_a_batch_kafka_refuses_fails_alone_while_concurrent_requests_land(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    big: AgentClient = agents("acme", "prod", "agent-big")
    small: list[AgentClient] = [agents("acme", "prod", f"agent-{i}") for i in range(4)]
    await topic_max_bytes(deployment, TOPIC_MAX_BYTES)

    refused_ids: list[str] = []
    accepted_ids: list[str] = []
    for _ in range(5):
        heavy = [big.heartbeat(message="x" * 1000) for _ in range(20)]
        light = [[agent.heartbeat()] for agent in small]
        answers = await asyncio.gather(
            big.post_events(heavy),
            *(agent.post_events(batch) for agent, batch in zip(small, light, strict=True)),
        )
        status, body = answers[0]
        # Kafka refused the whole 25 kB batch: 503, as for any broker refusal.
        assert status == 503, body
        refused_ids += [event["id"] for event in heavy]
        # The same customer's small requests, on the same partition at the same time, landed.
        for (status, body), batch in zip(answers[1:], light, strict=True):
            assert status == 202, body
            accepted_ids += [event["id"] for event in batch]

    on_topic = await topic_event_ids(deployment)
    assert sorted(on_topic) == sorted(accepted_ids)
    assert not set(refused_ids) & set(on_topic)


def kafka(action: str) -> None:
    subprocess.run(["bash", str(ROOT / "infra/local/kafka.sh"), action], check=True, timeout=120)


@pytest.mark.timeout(240)
async def test_a_request_refused_while_kafka_was_down_does_not_land_once_it_is_back(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    agent: AgentClient = agents("acme", "prod", "agent-1")
    first = [agent.heartbeat()]
    assert (await agent.post_events(first))[0] == 202

    kafka("stop")
    try:
        refused = [agent.heartbeat() for _ in range(5)]
        started = time.monotonic()
        status, body = await agent.post_events(refused)
        assert status == 503, body
        assert time.monotonic() - started < 5.0
    finally:
        kafka("start")

    # Every producer of both API processes (taken in turn) carries a request once
    # the broker is back: enough requests that each has delivered since.
    later: list[dict[str, Any]] = []
    for _ in range(20):

        async def post() -> int:
            batch = [agent.heartbeat()]
            status, _ = await agent.post_events(batch)
            if status == 202:
                later.extend(batch)
            return status

        await eventually(post, lambda status: status == 202, timeout_s=60, interval_s=0.5)

    on_topic = await topic_event_ids(deployment)
    assert set(on_topic) == {event["id"] for event in first + later}
    assert not {event["id"] for event in refused} & set(on_topic)

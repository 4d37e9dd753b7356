"""The end state every test of the event path can require: nothing stuck, nothing dead-lettered.

After the API's answers: every partition of the events topic is applied up to its
log end (the offset stored with the effects equals Kafka's, lag 0), and the
dead-letter topic holds no record.
"""

from __future__ import annotations

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.support.deployment import Deployment
from tests.support.ownership import log_end_offsets
from tests.support.waiting import eventually


async def dead_letter_count(deployment: Deployment) -> int:
    """Records on the deployment's dead-letter topic (Deployment.create makes it one partition)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=deployment.fleet.stack.kafka_bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(deployment.fleet.dead_letter_topic, 0)])
        return sum(ends.values())
    finally:
        await consumer.stop()


def stored_offsets(deployment: Deployment) -> dict[int, int]:
    """Each partition's next offset to apply, as the controllers stored it with the effects."""
    dsn = deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT partition, next_offset FROM partition_ownership WHERE topic = %s",
            (deployment.fleet.events_topic,),
        ).fetchall()
    return {partition: offset for partition, offset in rows}


async def partition_lag(deployment: Deployment) -> dict[int, int]:
    """Records of each partition not yet applied (log end minus stored next offset)."""
    ends = await log_end_offsets(deployment)
    stored = stored_offsets(deployment)
    return {partition: end - stored.get(partition, 0) for partition, end in ends.items()}


async def assert_drained(deployment: Deployment, *, timeout_s: float = 30.0) -> None:
    """Wait until every partition's lag is 0; then no record may be on the dead-letter topic.

    Raises AssertionError naming the lagging partitions or the dead-letter count.
    """
    await eventually(
        lambda: partition_lag(deployment),
        lambda lag: not any(lag.values()),
        timeout_s=timeout_s,
        what="every partition applied to its log end",
    )
    assert await dead_letter_count(deployment) == 0, "records were dead-lettered"

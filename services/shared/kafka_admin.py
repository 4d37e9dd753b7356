"""One way to talk to Kafka's admin API: a client scoped to a block, and a topic's partitions.

Every service that asks Kafka about topics opens the admin client with
``kafka_admin`` (so it is always closed) and reads partition ids with
``topic_partitions``. The ids come from a DescribeTopics request, answered by the
broker at that moment: a consumer's cached metadata (``partitions_for_topic``)
is not refreshed by ``consumer.topics()`` and can miss partitions added since.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiokafka.admin import AIOKafkaAdminClient

REQUEST_TIMEOUT_MS = 10_000


class TopicNotFound(LookupError):
    """The broker does not know the topic (or it has no partitions yet)."""

    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic} does not exist")
        self.topic = topic


@asynccontextmanager
async def kafka_admin(
    bootstrap: str, *, request_timeout_ms: int = REQUEST_TIMEOUT_MS
) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client for the block; closed on the way out, whatever happens."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def topic_partitions(admin: AIOKafkaAdminClient, topic: str) -> list[int]:
    """The topic's partition ids, sorted, as the broker describes them now.

    Raises TopicNotFound when the broker does not know the topic.
    """
    for described in await admin.describe_topics([topic]):
        if described["topic"] == topic and not described["error_code"] and described["partitions"]:
            return sorted(int(p["partition"]) for p in described["partitions"])
    raise TopicNotFound(topic)

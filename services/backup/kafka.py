"""Kafka's log start per partition: a restored offset below it means lost events."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.shared.topics import topic_partitions


class KafkaUnavailable(Exception):
    pass


async def _log_starts(bootstrap: str, topics: list[str]) -> dict[str, dict[int, int]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        await asyncio.wait_for(consumer.start(), timeout=15)
    except Exception as e:  # aiokafka raises several kinds; all mean "not reachable"
        raise KafkaUnavailable(f"Kafka at {bootstrap} unreachable: {e}") from e
    try:
        starts: dict[str, dict[int, int]] = {}
        cluster = await consumer.topics()
        for topic in topics:
            if topic not in cluster:
                raise KafkaUnavailable(f"topic {topic} does not exist in Kafka at {bootstrap}")
            tps = [TopicPartition(topic, p) for p in await topic_partitions(bootstrap, topic)]
            begin = await consumer.beginning_offsets(tps)
            starts[topic] = {tp.partition: int(begin[tp]) for tp in tps}
        return starts
    finally:
        await consumer.stop()


def log_starts(bootstrap: str, topics: list[str]) -> dict[str, dict[int, int]]:
    """topic -> partition -> offset of the oldest record Kafka still holds."""
    return asyncio.run(_log_starts(bootstrap, topics))


def gaps(
    stored: dict[str, dict[int, int]], starts: dict[str, dict[int, int]]
) -> list[tuple[str, int, int, int]]:
    """(topic, partition, stored offset, log start) wherever records were deleted unapplied.

    A partition without a stored offset starts from 0 when a controller first claims it.
    """
    found = []
    for topic, partitions in starts.items():
        for partition, start in sorted(partitions.items()):
            offset = stored.get(topic, {}).get(partition, 0)
            if offset < start:
                found.append((topic, partition, offset, start))
    return found

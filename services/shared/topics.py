"""Creating the project's Kafka topics with an explicit partition count.

Brokers run with ``auto.create.topics.enable=false``: a topic created by accident
would get the broker's default partition count, and the partition count decides
which controller owns a customer. ``python -m services.shared.topics`` creates
the events topic and its dead-letter topic if missing, and refuses to go on if an
existing events topic has a different partition count than configured (adding
partitions follows the drain-then-add runbook, never a silent change).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from services.shared import kafka_admin
from services.shared.settings import KafkaSettings

logger = logging.getLogger(__name__)


class PartitionCountMismatchError(RuntimeError):
    pass


async def ensure_topics(bootstrap: str, wanted: dict[str, int]) -> dict[str, int]:
    """Create each topic in ``wanted`` (name -> partitions) that is missing.

    Returns every wanted topic's actual partition count.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, num_partitions=count, replication_factor=1)
            for name, count in wanted.items()
            if name not in existing
        ]
        if missing:
            # Created concurrently by another starter: the count check below decides.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
            for topic in missing:
                logger.info("created topic %s (%d partitions)", topic.name, topic.num_partitions)
        described = await admin.describe_topics(list(wanted))
        return {d["topic"]: len(d["partitions"]) for d in described}
    finally:
        await admin.close()


async def topic_partitions(bootstrap: str, topic: str) -> list[int]:
    """The topic's partition numbers, ascending; LookupError if it does not exist.

    One admin client for this one question; ``services.shared.kafka_admin`` holds
    the implementation (and a scoped client for callers that ask more).
    """
    async with kafka_admin.kafka_admin(bootstrap) as admin:
        return await kafka_admin.topic_partitions(admin, topic)


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


async def add_partitions(bootstrap: str, topic: str, total: int, timeout_s: float = 30.0) -> int:
    """Grow ``topic`` to ``total`` partitions; return the count once every broker reports it.

    Only ever called by the drain-then-add procedure (services.controller.partitions):
    new partitions move customers, see docs/runbooks/partitions.md.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await admin.create_partitions({topic: NewPartitions(total_count=total)})
        # The controller answers once the partitions exist; metadata reaches the
        # brokers (and so producers) a moment later.
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            described = await admin.describe_topics([topic])
            partitions = described[0]["partitions"]
            if len(partitions) >= total and all(p["leader"] >= 0 for p in partitions):
                return len(partitions)
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{topic} still shows {len(partitions)} partitions")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def ensure_journal_topic(bootstrap: str, name: str) -> None:
    """The identity journal's topic: one partition (one order), compacted, never expired.

    Every record has a key of its own (or a later one that supersedes it), so
    compaction keeps every change while ``retention.ms=-1`` keeps them forever.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        if name in set(await admin.list_topics()):
            return
        topic = NewTopic(
            name,
            num_partitions=1,
            replication_factor=1,
            topic_configs={"cleanup.policy": "compact", "retention.ms": "-1"},
        )
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([topic])
        logger.info("created topic %s (identity journal)", name)
    finally:
        await admin.close()


async def ensure_project_topics(settings: KafkaSettings) -> None:
    counts = await ensure_topics(
        settings.kafka_bootstrap,
        {settings.events_topic: settings.topic_partitions, settings.dead_letter_topic: 1},
    )
    await ensure_journal_topic(settings.kafka_bootstrap, settings.identity_topic)
    actual = counts.get(settings.events_topic)
    if actual != settings.topic_partitions:
        raise PartitionCountMismatchError(
            f"{settings.events_topic} has {actual} partitions but {settings.topic_partitions} "
            "are configured; see docs/runbooks/partitions.md before changing the count"
        )


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m services.shared.topics",
        description="Create the events topic, its dead-letter topic and the identity journal "
        "if missing (FLEETPLANE_KAFKA_BOOTSTRAP, FLEETPLANE_EVENTS_TOPIC, "
        "FLEETPLANE_TOPIC_PARTITIONS, FLEETPLANE_IDENTITY_TOPIC).",
    ).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    try:
        asyncio.run(ensure_project_topics(KafkaSettings()))
    except PartitionCountMismatchError as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

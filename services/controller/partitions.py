"""Adding partitions to the events topic without reordering any customer's events.

A customer's records go to ``murmur2(customer) % partitions``, so adding
partitions moves customers. Their older records stay in the old partition and
their newer ones land in the new one; the two partitions are applied
independently (each under its own fence), so without care the newer events of
a moving customer can apply before its older ones. The procedure, also in
``docs/runbooks/partitions.md``:

1. pause intake for the topic;
2. wait until every partition is drained: the offset stored with the effects
   equals the log end, so every old record of every customer is applied;
3. add the partitions;
4. keep intake paused until every producer has refreshed its metadata, so no
   producer still sends a moving customer to its old partition;
5. resume intake.

The pause is a topic setting: ``max.message.bytes=0`` makes the broker refuse
every write to the topic (MESSAGE_TOO_LARGE) while the topic's existing records
stay readable. The API answers those writes 503 with Retry-After, which agents
and operators retry with the same ids (invariant 2: nothing lost, nothing
doubled). It is enforced by Kafka itself for every producer, however many API
instances there are, and survives the tool crashing: ``resume`` lifts it.

``python -m services.controller.partitions add --to N`` runs all five steps;
``pause``, ``resume`` and ``lag`` are the single steps for doing it by hand or
rolling back.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from services.shared.kafka_admin import TopicNotFound, kafka_admin
from services.shared.kafka_admin import topic_partitions as shared_topic_partitions
from services.shared.settings import DatabaseSettings, KafkaSettings
from services.shared.topics import add_partitions

logger = logging.getLogger("services.controller.partitions")

PAUSE_SETTING = "max.message.bytes"
PAUSED_VALUE = "0"
_DYNAMIC_TOPIC_CONFIG = 1
"""DescribeConfigs' config_source for a value set on the topic itself."""


class ProcedureError(RuntimeError):
    """A step could not be done; intake was left as the message says."""


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    stored: int
    """The next offset to apply, as stored with the effects (the log start if never owned)."""
    log_end: int

    @property
    def lag(self) -> int:
        return max(self.log_end - self.stored, 0)


# --- Intake: the topic's max.message.bytes -------------------------------------------


async def _topic_overrides(admin: AIOKafkaAdminClient, topic: str) -> dict[str, str]:
    """The settings set on the topic itself (not inherited from the broker)."""
    [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    [(error_code, error_message, _type, _name, entries)] = response.resources
    if error_code:
        raise ProcedureError(f"cannot read the settings of {topic}: {error_message}")
    overrides: dict[str, str] = {}
    for name, value, _read_only, source, sensitive, *_ in entries:
        if source != _DYNAMIC_TOPIC_CONFIG:
            continue
        if sensitive or value is None:
            # AlterConfigs replaces every override: one we cannot read, we cannot keep.
            raise ProcedureError(f"{topic} has a sensitive setting {name}; change it by hand")
        overrides[name] = value
    return overrides


async def _set_overrides(admin: AIOKafkaAdminClient, topic: str, overrides: dict[str, str]) -> None:
    # aiokafka has no IncrementalAlterConfigs: AlterConfigs sets the whole list.
    [response] = await admin.alter_configs(
        [ConfigResource(ConfigResourceType.TOPIC, topic, overrides)]
    )
    for error_code, error_message, *_ in response.resources:
        if error_code:
            raise ProcedureError(f"cannot change the settings of {topic}: {error_message}")


async def pause_intake(bootstrap: str, topic: str) -> str | None:
    """Make the broker refuse every write to ``topic``; return the setting's previous override.

    None means the topic had no override of its own (it used the broker's default).
    """
    async with kafka_admin(bootstrap) as admin:
        overrides = await _topic_overrides(admin, topic)
        previous = overrides.get(PAUSE_SETTING)
        if previous == PAUSED_VALUE:
            raise ProcedureError(
                f"intake of {topic} is already paused ({PAUSE_SETTING}=0): another run of "
                "this procedure, or one that did not finish; see docs/runbooks/partitions.md"
            )
        await _set_overrides(admin, topic, {**overrides, PAUSE_SETTING: PAUSED_VALUE})
        logger.info(
            "paused intake of %s (%s=0; it was %s)",
            topic,
            PAUSE_SETTING,
            previous if previous is not None else "the broker default",
        )
        return previous


async def resume_intake(bootstrap: str, topic: str, previous: str | None) -> None:
    """Lift the pause: restore ``previous`` (None: back to the broker's default)."""
    async with kafka_admin(bootstrap) as admin:
        overrides = await _topic_overrides(admin, topic)
        overrides.pop(PAUSE_SETTING, None)
        if previous is not None:
            overrides[PAUSE_SETTING] = previous
        await _set_overrides(admin, topic, overrides)
        logger.info("resumed intake of %s", topic)


async def intake_paused(bootstrap: str, topic: str) -> bool:
    async with kafka_admin(bootstrap) as admin:
        return (await _topic_overrides(admin, topic)).get(PAUSE_SETTING) == PAUSED_VALUE


# --- Drain ---------------------------------------------------------------------------


async def topic_partitions(bootstrap: str, topic: str) -> list[int]:
    async with kafka_admin(bootstrap) as admin:
        try:
            return await shared_topic_partitions(admin, topic)
        except TopicNotFound as e:
            raise ProcedureError(f"topic {topic} not found") from e


async def partition_lag(kafka: KafkaSettings, database: DatabaseSettings) -> list[PartitionLag]:
    """Per partition: the offset stored with the effects against Kafka's log end."""
    topic = kafka.events_topic
    tps = [TopicPartition(topic, p) for p in await topic_partitions(kafka.kafka_bootstrap, topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.kafka_bootstrap)
    await consumer.start()
    try:
        log_start = await consumer.beginning_offsets(tps)
        log_end = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    async with await psycopg.AsyncConnection.connect(database.libpq_dsn) as conn:
        rows = await conn.execute(
            "SELECT partition, next_offset FROM partition_ownership WHERE topic = %s", (topic,)
        )
        stored = {int(p): int(n) for p, n in await rows.fetchall()}
    return [
        PartitionLag(tp.partition, stored.get(tp.partition, int(log_start[tp])), int(log_end[tp]))
        for tp in tps
    ]


async def wait_drained(
    kafka: KafkaSettings,
    database: DatabaseSettings,
    *,
    timeout_s: float,
    settle_s: float = 1.0,
) -> list[PartitionLag]:
    """Return once every partition's lag is zero twice in a row, ``settle_s`` apart.

    Two readings with the same log ends also show that no write got through after
    the pause (a broker that learned of it late would show a moving log end).
    """
    deadline = time.monotonic() + timeout_s
    previous: list[PartitionLag] | None = None
    while True:
        lags = await partition_lag(kafka, database)
        if all(p.lag == 0 for p in lags) and lags == previous:
            return lags
        if time.monotonic() > deadline:
            behind = ", ".join(f"[{p.partition}] {p.lag}" for p in lags if p.lag)
            raise ProcedureError(
                f"not drained after {timeout_s:.0f} s (lag by partition: {behind or 'none'}, "
                "log ends still moving); are the controllers running and none refusing a "
                "partition?"
            )
        previous = lags
        await asyncio.sleep(settle_s)


# --- The procedure -------------------------------------------------------------------


async def add(
    kafka: KafkaSettings,
    database: DatabaseSettings,
    total: int,
    *,
    drain_timeout_s: float,
    producer_metadata_max_age_s: float,
    settle_s: float = 1.0,
) -> int:
    """Drain, then add partitions up to ``total``; intake is resumed whatever happens.

    Returns the new partition count.
    """
    topic = kafka.events_topic
    current = len(await partition_lag(kafka, database))
    if total <= current:
        raise ProcedureError(
            f"{topic} has {current} partitions; Kafka can only add, so ask for more than that"
        )
    previous = await pause_intake(kafka.kafka_bootstrap, topic)
    adding = False
    added_at: float | None = None
    try:
        # A write accepted by a broker just before it saw the pause shows in the log
        # end; the drain below waits for it like for any other record.
        await asyncio.sleep(settle_s)
        logger.info("waiting for every partition of %s to drain", topic)
        await wait_drained(kafka, database, timeout_s=drain_timeout_s, settle_s=settle_s)
        logger.info("drained: every record of %s is applied", topic)
        adding = True
        count = await add_partitions(kafka.kafka_bootstrap, topic, total)
        added_at = time.monotonic()
        logger.info("%s now has %d partitions", topic, count)
        return count
    finally:
        if adding:
            # Producers pick a partition from their cached metadata: until it is
            # refreshed, one would still send a moving customer to its old partition.
            # (Also when adding failed: the partitions may exist all the same.)
            since = added_at if added_at is not None else time.monotonic()
            wait_s = producer_metadata_max_age_s + settle_s - (time.monotonic() - since)
            if wait_s > 0:
                logger.info(
                    "keeping intake paused %.0f s more, until every producer has seen the "
                    "new partitions",
                    wait_s,
                )
                await asyncio.sleep(wait_s)
        await resume_intake(kafka.kafka_bootstrap, topic, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.controller.partitions",
        description="Drain-then-add partitions of the events topic (docs/runbooks/partitions.md). "
        "Reads FLEETPLANE_KAFKA_BOOTSTRAP, FLEETPLANE_EVENTS_TOPIC and FLEETPLANE_DATABASE_*.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_cmd = commands.add_parser("add", help="pause, drain, add partitions, resume")
    add_cmd.add_argument("--to", type=int, required=True, help="the new partition count")
    add_cmd.add_argument(
        "--drain-timeout-s",
        type=float,
        default=300.0,
        help="give up (and resume, unchanged) if not drained by then (default 300)",
    )
    add_cmd.add_argument(
        "--producer-metadata-max-age-s",
        type=float,
        default=10.0,
        help="the API's FLEETPLANE_API_PRODUCER_METADATA_MAX_AGE_S (default 10): how long "
        "intake stays paused after the partitions are added",
    )
    commands.add_parser("pause", help="make the broker refuse writes to the events topic")
    resume_cmd = commands.add_parser("resume", help="lift the pause")
    resume_cmd.add_argument(
        "--max-message-bytes",
        help=f"the topic's own {PAUSE_SETTING} to restore, if it had one before the pause "
        "(default: none, the broker's default applies)",
    )
    commands.add_parser("lag", help="stored offset, log end and lag of every partition")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    kafka, database = KafkaSettings(), DatabaseSettings()
    try:
        return asyncio.run(_run(args, kafka, database))
    except ProcedureError as e:
        logger.error("%s", e)
        return 1


async def _run(args: Any, kafka: KafkaSettings, database: DatabaseSettings) -> int:
    topic = kafka.events_topic
    if args.command == "add":
        count = await add(
            kafka,
            database,
            args.to,
            drain_timeout_s=args.drain_timeout_s,
            producer_metadata_max_age_s=args.producer_metadata_max_age_s,
        )
        print(
            f"{topic} has {count} partitions and intake is resumed. Now set "
            f"FLEETPLANE_TOPIC_PARTITIONS={count} wherever it is configured (environment, "
            "docker-compose.yml, the Kubernetes overlays): `python -m services.shared.topics` "
            "refuses a count that differs from the topic's. Up to "
            f"{count} controllers can now work at once."
        )
    elif args.command == "pause":
        previous = await pause_intake(kafka.kafka_bootstrap, topic)
        if previous is not None:
            print(
                "to resume: python -m services.controller.partitions resume "
                f"--max-message-bytes {previous}"
            )
    elif args.command == "resume":
        if not await intake_paused(kafka.kafka_bootstrap, topic):
            print(f"intake of {topic} is not paused")
            return 0
        await resume_intake(kafka.kafka_bootstrap, topic, args.max_message_bytes)
    else:
        for p in await partition_lag(kafka, database):
            print(f"{topic}[{p.partition}] stored {p.stored} log end {p.log_end} lag {p.lag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Dead letters: reading them back, and replaying them to their source topic after a fix.

The controller dead-letters a poison record with its original key and value and
headers saying why and where it came from (``topics.TopicDeadLetters``). After
the cause is fixed (a controller that now accepts the record, or a corrected
copy of the value), ``replay`` produces the record to its source topic again,
with the original key, so it lands in the customer's current partition and
takes its place behind what that customer sent since; a header marks it as a
replay of a given dead letter.

Replaying is safe to repeat: agent events are deduplicated by event id, desired-
state changes by change id. A replayed event older than what its agent sent
since is recorded as rejected (stale sequence), like any late event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.controller.handlers import Delivered, Poison, decode
from services.controller.ops import topic_partitions

REPLAY_OF_HEADER = "fleetplane-replay-of"
"""``<dead-letter topic>/<partition>/<offset>`` of the dead letter a record replays."""
REPLAYED_AT_HEADER = "fleetplane-replayed-at"
REPLAY_EDITED_HEADER = "fleetplane-replay-edited"
"""Present (``1``) when the replayed value is a corrected copy, not the original bytes."""

LetterId = tuple[int, int]
"""(partition, offset) of a record in the dead-letter topic."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]

    def _header(self, name: str) -> str:
        return self.headers.get(name, b"").decode(errors="replace")

    @property
    def reason(self) -> str:
        return self._header("fleetplane-dlq-reason")

    @property
    def detail(self) -> str:
        return self._header("fleetplane-dlq-detail")

    @property
    def sqlstate(self) -> str | None:
        """PostgreSQL's error code when the database refused the record."""
        return self._header("fleetplane-dlq-sqlstate") or None

    @property
    def source_topic(self) -> str:
        return self._header("fleetplane-source-topic")

    @property
    def source_partition(self) -> int:
        return int(self._header("fleetplane-source-partition") or -1)

    @property
    def source_offset(self) -> int:
        return int(self._header("fleetplane-source-offset") or -1)

    def preview(self, length: int = 120) -> str:
        """The start of the value, printable: bytes that are not UTF-8 are escaped."""
        if self.value is None:
            return "(no value)"
        text = self.value[:length].decode("utf-8", errors="backslashreplace")
        # Control characters would garble a terminal; show them escaped.
        text = "".join(
            c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
        )
        return text + ("…" if len(self.value) > length else "")

    def to_json(self) -> dict[str, object]:
        return {
            "partition": self.partition,
            "offset": self.offset,
            "dead_lettered_at": datetime.fromtimestamp(self.timestamp_ms / 1000, UTC).isoformat(),
            "reason": self.reason,
            "detail": self.detail,
            "sqlstate": self.sqlstate,
            "source_topic": self.source_topic,
            "source_partition": self.source_partition,
            "source_offset": self.source_offset,
            "key": None if self.key is None else self.key.decode(errors="backslashreplace"),
            "value_bytes": None if self.value is None else len(self.value),
            "value_preview": self.preview(),
        }


async def read_dead_letters(
    bootstrap: str,
    topic: str,
    *,
    last: int | None = None,
    only: Iterable[LetterId] | None = None,
    timeout_s: float = 30.0,
) -> list[DeadLetter]:
    """Read the dead-letter topic, in (partition, offset) order.

    ``last`` keeps the newest ``last`` records of each partition; ``only`` reads just
    those (partition, offset) pairs, missing ones are simply absent from the result.
    Uses a consumer without a group: reading commits nothing. Raises LookupError if
    the topic does not exist, TimeoutError if Kafka does not answer in time.
    """
    wanted = set(only) if only is not None else None
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    async with asyncio.timeout(timeout_s):
        await consumer.start()
    try:
        async with asyncio.timeout(timeout_s):
            return await _read(consumer, bootstrap, topic, last, wanted)
    finally:
        await consumer.stop()


async def _read(
    consumer: AIOKafkaConsumer,
    bootstrap: str,
    topic: str,
    last: int | None,
    wanted: set[LetterId] | None,
) -> list[DeadLetter]:
    tps = [TopicPartition(topic, p) for p in await topic_partitions(bootstrap, topic)]
    consumer.assign(tps)
    starts = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
    pending: dict[TopicPartition, int] = {}
    for tp in tps:
        begin, end = starts[tp], ends[tp]
        if wanted is not None:
            mine = [o for p, o in wanted if p == tp.partition and begin <= o < end]
            if mine:
                begin, end = min(mine), max(mine) + 1
            else:
                begin = end
        elif last is not None:
            begin = max(begin, end - last)
        if begin < end:
            consumer.seek(tp, begin)
            pending[tp] = end
    letters: list[DeadLetter] = []
    while pending:
        batches = await consumer.getmany(*pending, timeout_ms=1000)
        for tp, records in batches.items():
            end = pending.get(tp)
            if end is None:
                continue
            for r in records:
                if r.offset >= end:
                    break
                if wanted is None or (tp.partition, r.offset) in wanted:
                    letters.append(
                        DeadLetter(
                            topic=tp.topic,
                            partition=tp.partition,
                            offset=r.offset,
                            timestamp_ms=r.timestamp,
                            key=r.key,
                            value=r.value,
                            headers={k: bytes(v) for k, v in r.headers},
                        )
                    )
        for tp in list(pending):
            if await consumer.position(tp) >= pending[tp]:
                del pending[tp]
    return sorted(letters, key=lambda d: (d.partition, d.offset))


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    letter: DeadLetter
    action: Literal["replayed", "skipped", "would replay"]
    why: str
    """The record's validity now: "valid", or the reason it would be dead-lettered again."""
    target: tuple[str, int, int] | None = None
    """(topic, partition, offset) of the replayed record."""


def verdict(letter: DeadLetter, value: bytes | None) -> str:
    """ "valid" if the controller would apply the record now, else why it would not."""
    result = decode(
        Delivered(
            partition=letter.source_partition,
            offset=letter.source_offset,
            key=letter.key,
            value=value,
        )
    )
    if isinstance(result, Poison):
        return f"{result.reason}: {result.detail}"
    return "valid"


async def replay(
    bootstrap: str,
    letters: list[DeadLetter],
    *,
    fallback_topic: str,
    only_valid: bool = False,
    replacement: bytes | None = None,
    dry_run: bool = False,
) -> list[ReplayOutcome]:
    """Produce each dead letter back to its source topic, in order, with its original key.

    ``replacement`` replaces the value (a corrected copy; one letter only).
    ``only_valid`` skips records the controller would dead-letter again. Returns once
    Kafka acknowledged every replayed record (acks=all, idempotent producer).
    """
    if replacement is not None and len(letters) != 1:
        raise ValueError("a replacement value replays exactly one dead letter")
    outcomes: list[ReplayOutcome] = []
    planned: list[tuple[DeadLetter, bytes | None, str]] = []
    for letter in letters:
        value = replacement if replacement is not None else letter.value
        why = verdict(letter, value)
        if only_valid and why != "valid":
            outcomes.append(ReplayOutcome(letter, "skipped", why))
        elif dry_run:
            outcomes.append(ReplayOutcome(letter, "would replay", why))
        else:
            planned.append((letter, value, why))
    if not planned:
        return outcomes
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for letter, value, why in planned:
            topic = letter.source_topic or fallback_topic
            headers = [
                (REPLAY_OF_HEADER, f"{letter.topic}/{letter.partition}/{letter.offset}".encode()),
                (REPLAYED_AT_HEADER, datetime.now(UTC).isoformat().encode()),
            ]
            if replacement is not None:
                headers.append((REPLAY_EDITED_HEADER, b"1"))
            # One at a time: a customer's replayed records keep their dead-letter order.
            sent = await producer.send_and_wait(topic, value, key=letter.key, headers=headers)
            outcomes.append(
                ReplayOutcome(letter, "replayed", why, (topic, sent.partition, sent.offset))
            )
    finally:
        await producer.stop()
    return sorted(outcomes, key=lambda o: (o.letter.partition, o.letter.offset))


def parse_letter_id(text: str) -> LetterId:
    """``OFFSET`` (partition 0, the usual single-partition topic) or ``PARTITION:OFFSET``."""
    partition, _, offset = text.rpartition(":")
    try:
        return (int(partition) if partition else 0, int(offset))
    except ValueError:
        raise ValueError(f"{text!r} is not OFFSET or PARTITION:OFFSET") from None

"""The identity journal: agent-identity changes in a Kafka topic, for restores.

gateway_auth's tables live in PostgreSQL with everything else, so a restore of a
backup would forget every revocation, certificate, consumed enrollment token,
issuing-CA change and operator-key change made after it: a revoked agent or key
would work again. gateway_auth therefore appends each change to this journal
*before* its transaction commits (a failed append rolls the change back), and
``services.backup`` replays the whole journal into a restored database. Replay is
idempotent, and an entry whose transaction did not commit errs on the safe side
(a revocation or a consumed token the operator was told failed).

Entries are JSON: ``{"kind": ..., "row": {...}}``, keyed so that compaction keeps
every change (or only the newest retirement of one CA).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import Column, ColumnElement, Connection

from services.shared.settings import KafkaSettings

Kind = Literal[
    "revocation",
    "certificate",
    "token_used",
    "issuer",
    "issuer_retired",
    "operator_key",
    "operator_key_revoked",
]
APPEND_TIMEOUT_S: Final = 5.0


class JournalUnavailable(Exception):
    """Kafka did not take the entry: the change must not commit."""


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    return value


def encode(kind: Kind, row: Mapping[str, Any]) -> bytes:
    return json.dumps({"kind": kind, "row": {k: _plain(v) for k, v in row.items()}}).encode()


class IdentityJournal:
    """Appends entries with acks=all on an idempotent producer. ``start`` before use."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", enable_idempotence=True
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def append(self, kind: Kind, key: str, row: Mapping[str, Any]) -> None:
        """Durable in Kafka when it returns; raises JournalUnavailable otherwise."""
        try:
            await asyncio.wait_for(
                self._producer.send_and_wait(
                    self.topic, encode(kind, row), key=f"{kind}:{key}".encode()
                ),
                APPEND_TIMEOUT_S,
            )
        except TimeoutError as e:
            raise JournalUnavailable(
                f"identity journal {self.topic}: not acknowledged within {APPEND_TIMEOUT_S} s "
                "(Kafka down, or the topic missing: python -m services.shared.topics)"
            ) from e
        except Exception as e:  # aiokafka's errors: not durable either
            raise JournalUnavailable(f"identity journal {self.topic}: {e!r}") from e


async def _append_once(
    bootstrap: str, topic: str, kind: Kind, key: str, row: Mapping[str, Any]
) -> None:
    """One entry on a short-lived producer of its own."""
    journal = IdentityJournal(bootstrap, topic)
    try:
        await asyncio.wait_for(journal.start(), APPEND_TIMEOUT_S)
    except Exception as e:
        raise JournalUnavailable(f"identity journal {topic}: Kafka at {bootstrap}: {e!r}") from e
    try:
        await journal.append(kind, key, row)
    finally:
        await journal.stop()


def append_from_tool(
    kafka: KafkaSettings | None, kind: Kind, key: str, row: Mapping[str, Any]
) -> None:
    """One entry from a command-line tool, before it commits; blocks until Kafka acknowledged.

    Raises JournalUnavailable when Kafka cannot be reached (the caller's
    transaction then rolls back). ``kafka`` None journals nothing: only tests that
    set up the database without Kafka pass it.
    """
    if kafka is not None:
        asyncio.run(_append_once(kafka.kafka_bootstrap, kafka.identity_topic, kind, key, row))


async def read_all(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every entry in the journal, oldest first (up to the end when called)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    try:
        await asyncio.wait_for(consumer.start(), 15)
    except Exception as e:
        raise JournalUnavailable(f"identity journal {topic}: Kafka at {bootstrap}: {e!r}") from e
    try:
        if topic not in await consumer.topics():
            raise JournalUnavailable(f"identity journal {topic} does not exist")
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        # An explicit seek: seek_to_beginning only asks for a reset, which can
        # still be pending when position() answers.
        consumer.seek(tp, (await consumer.beginning_offsets([tp]))[tp])
        entries: list[dict[str, Any]] = []
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for message in batch.get(tp, []):
                if message.offset < end and message.value is not None:
                    entries.append(json.loads(message.value))
        return entries
    finally:
        await consumer.stop()


def stamp_from_tool(
    conn: Connection,
    kafka: KafkaSettings | None,
    kind: Kind,
    key: tuple[Column[Any], str],
    stamp: tuple[Column[Any], Any],
    *where: ColumnElement[bool],
) -> bool:
    """Set one timestamp column of the row ``key`` names and journal it; False if no row matched.

    ``stamp`` is the column and the SQL value to set; ``where`` narrows the match
    (``revoked_at IS NULL``). The entry carries the key and the stored timestamp,
    appended before the caller's transaction commits (see ``append_from_tool``).
    """
    key_column, key_value = key
    stamp_column, value = stamp
    statement = (
        key_column.table.update()
        .where(key_column == key_value, *where)
        .values({stamp_column.name: value})
        .returning(stamp_column)
    )
    stored = conn.execute(statement).scalar_one_or_none()
    if stored is not None:
        entry = {key_column.name: key_value, stamp_column.name: stored}
        append_from_tool(kafka, kind, key_value, entry)
    return stored is not None

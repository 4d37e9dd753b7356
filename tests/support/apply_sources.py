"""Two sources of records for the apply contract tests: one in memory, one on real Kafka.

The applier asks its source for seeks and log starts (``applier.RecordSource``);
the contract tests also append records to a log and fetch what a reader has not
read yet. ``MemoryLog`` and ``KafkaLog`` offer the same operations, so one set of
tests runs against both (in the spirit of getsentry/arroyo's backend tests, which
run one test body over its in-memory broker and over Kafka).

A reader's ``fetch`` returns everything from its position to the log's end at the
moment of the call, each partition in offset order, as one batch: the same batch
from both sources, so a test's expectations do not depend on fetch sizes.
"""

from __future__ import annotations

import time
from typing import Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.controller.applier import RecordSource
from services.controller.handlers import Delivered


class Reader(RecordSource, Protocol):
    async def fetch(self) -> list[Delivered]:
        """Every record from the reader's positions to the log's end, then positions at the end."""

    async def close(self) -> None: ...


class Log(Protocol):
    partitions: list[int]

    async def append(self, partition: int, key: bytes, value: bytes) -> int:
        """Append one record; return its offset."""

    async def reader(self) -> Reader:
        """A new reader of every partition, positioned at the start of each."""

    async def close(self) -> None: ...


class MemoryLog:
    def __init__(self, partitions: int) -> None:
        self.partitions = list(range(partitions))
        self.records: dict[int, list[tuple[bytes, bytes]]] = {p: [] for p in self.partitions}

    async def append(self, partition: int, key: bytes, value: bytes) -> int:
        self.records[partition].append((key, value))
        return len(self.records[partition]) - 1

    async def reader(self) -> Reader:
        return MemoryReader(self)

    async def close(self) -> None:
        return None


class MemoryReader:
    def __init__(self, log: MemoryLog) -> None:
        self._log = log
        self.positions = dict.fromkeys(log.partitions, 0)

    async def seek(self, partition: int, offset: int) -> None:
        self.positions[partition] = offset

    async def log_start(self, partition: int) -> int:
        return 0

    async def fetch(self) -> list[Delivered]:
        batch = []
        for partition, records in self._log.records.items():
            start = self.positions[partition]
            batch += [
                Delivered(partition, offset, key, value)
                for offset, (key, value) in enumerate(records[start:], start)
            ]
            self.positions[partition] = len(records)
        return batch

    async def close(self) -> None:
        return None


class KafkaLog:
    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.partitions = list(range(partitions))
        self._bootstrap = bootstrap
        self._topic = topic
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        self._readers: list[KafkaReader] = []

    async def start(self) -> KafkaLog:
        await self._producer.start()
        return self

    async def append(self, partition: int, key: bytes, value: bytes) -> int:
        sent = await self._producer.send_and_wait(self._topic, value, key=key, partition=partition)
        return int(sent.offset)

    async def reader(self) -> Reader:
        reader = KafkaReader(self._bootstrap, self._topic, self.partitions)
        await reader.start()
        self._readers.append(reader)
        return reader

    async def close(self) -> None:
        for reader in self._readers:
            await reader.close()
        await self._producer.stop()


class KafkaReader:
    """A consumer assigned every partition (no group: the test plays the rebalances)."""

    def __init__(self, bootstrap: str, topic: str, partitions: list[int]) -> None:
        self._tps = [TopicPartition(topic, p) for p in partitions]
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
        )

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign(self._tps)
        for tp in self._tps:
            self._consumer.seek(tp, 0)

    async def seek(self, partition: int, offset: int) -> None:
        self._consumer.seek(self._tps[partition], offset)

    async def log_start(self, partition: int) -> int:
        tp = self._tps[partition]
        return int((await self._consumer.beginning_offsets([tp]))[tp])

    async def fetch(self) -> list[Delivered]:
        ends = await self._consumer.end_offsets(self._tps)
        by_partition: dict[int, list[Delivered]] = {tp.partition: [] for tp in self._tps}
        deadline = time.monotonic() + 15
        while True:
            behind = [tp for tp in self._tps if await self._consumer.position(tp) < ends[tp]]
            if not behind:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"Kafka did not deliver up to {ends} within 15 s")
            fetched = await self._consumer.getmany(*behind, timeout_ms=200)
            for tp, records in fetched.items():
                by_partition[tp.partition] += [
                    Delivered(tp.partition, r.offset, r.key, r.value)
                    for r in records
                    if r.offset < ends[tp]
                ]
                if records and records[-1].offset >= ends[tp]:
                    # Past the end taken at the call: left for the next fetch.
                    self._consumer.seek(tp, ends[tp])
        return [d for partition in sorted(by_partition) for d in by_partition[partition]]

    async def close(self) -> None:
        await self._consumer.stop()

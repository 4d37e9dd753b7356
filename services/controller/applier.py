"""The applier: one fenced PostgreSQL transaction per consumed batch.

A source (the Kafka consumer in production, ``RecordSource``) hands in consumed
records; this module filters what was already applied, sends poison to the
dead-letter topic, and has ``store.apply_batch`` plan the effects and write them
with every partition's next offset, under the epoch fence.
Two kinds of failure, as in every stream processor worth copying:

- back-pressure: PostgreSQL unreachable. The batch is retried with capped,
  jittered backoff for as long as this controller owns the partition; nothing
  goes to the dead-letter topic and the partition does not move on;
- poison: a record that can never apply. It is dead-lettered with its reason and
  counted in the stored offset, so the partition keeps moving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from aiokafka.errors import IllegalStateError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

from services.controller.claims import Ownerships
from services.controller.failures import describe, is_back_pressure, sqlstate_of
from services.controller.handlers import (
    Decoded,
    DecodedChange,
    Delivered,
    Plan,
    Poison,
    decode,
)
from services.controller.metrics import ControllerMetrics
from services.controller.ownership import (
    Claim,
    FencedError,
)
from services.controller.store import (
    BatchPart,
    PendingFence,
    apply_batch,
)

logger = logging.getLogger(__name__)

Seek = Callable[[int, int], Awaitable[None]]
"""Seek the consumer's position of a partition (partition, offset)."""
LogStart = Callable[[int], Awaitable[int]]
"""The log-start offset of a partition: the oldest record Kafka still has."""


class RecordSource(Protocol):
    """What the applier asks of the source of its records.

    The Kafka consumer in production (``consumer.PartitionConsumer``); an in-memory
    source in the apply contract tests, which drive the applier through the same
    interface against both.
    """

    async def seek(self, partition: int, offset: int) -> None:
        """Deliver ``partition`` again from ``offset`` (the applier's stored offset)."""

    async def log_start(self, partition: int) -> int:
        """The oldest offset the source still holds for ``partition``."""


@dataclass(frozen=True, slots=True)
class CallableSource:
    """A ``RecordSource`` made of two callables."""

    seek_to: Seek
    log_start_of: LogStart

    async def seek(self, partition: int, offset: int) -> None:
        await self.seek_to(partition, offset)

    async def log_start(self, partition: int) -> int:
        return await self.log_start_of(partition)


class DeadLetterSink(Protocol):
    async def send(self, poison: Poison) -> None:
        """Publish ``poison`` to the dead-letter topic; return only once acknowledged."""


@dataclass(frozen=True, slots=True)
class _PartitionWork:
    claim: Claim
    first_offset: int
    """Where this work starts: the partition's stored offset when it was prepared."""
    decoded: list[Decoded | DecodedChange]
    next_offset: int
    """The stored offset once this work is applied (decoding poison in between included)."""
    gap_after: bool = False
    """The batch held later records of this partition, past a gap (see _contiguous_run)."""

    @property
    def records(self) -> int:
        """Records consumed, poison included."""
        return self.next_offset - self.first_offset

    def split(self) -> tuple[_PartitionWork, _PartitionWork]:
        """Two halves in offset order: the left ends where the right's first record starts.

        Each half is applied in its own transaction with its own fence and offset, so
        the left commits first and the partition's order holds. Needs two records.
        """
        half = len(self.decoded) // 2
        boundary = self.decoded[half].delivered.offset
        left = replace(self, decoded=self.decoded[:half], next_offset=boundary, gap_after=False)
        right = replace(self, first_offset=boundary, decoded=self.decoded[half:])
        return left, right


class GuardedSeek:
    """Seeks only partitions the consumer is assigned at that moment.

    A rebalance can take a partition away between the decision to seek and the seek
    itself; aiokafka then raises ``IllegalStateError`` ("No current assignment").
    Such a seek has nothing left to do, since the new owner starts at the stored
    offset, so it is skipped with a log line instead of crashing the apply loop.
    """

    def __init__(self, seek: Seek, assigned: Callable[[int], bool]) -> None:
        self._seek = seek
        self._assigned = assigned

    async def __call__(self, partition: int, offset: int) -> None:
        if not self._assigned(partition):
            logger.info(
                "partition %d is no longer assigned; not seeking it to %d", partition, offset
            )
            return
        try:
            await self._seek(partition, offset)
        except IllegalStateError as e:
            logger.info("partition %d was unassigned while seeking to %d: %s", partition, offset, e)


class Applier:
    """Applies consumed records of the partitions held in ``ownerships``."""

    def __init__(
        self,
        engine: AsyncEngine,
        ownerships: Ownerships,
        dead_letters: DeadLetterSink,
        source: RecordSource,
        metrics: ControllerMetrics,
        *,
        max_backoff_s: float = 5.0,
        ack_timeout_s: float = 30.0,
    ) -> None:
        self._engine = engine
        self._ownerships = ownerships
        self._dead_letters = dead_letters
        self._source = source
        self._metrics = metrics
        self._max_backoff_s = max_backoff_s
        self._ack_timeout_s = ack_timeout_s
        self.before_fence: Callable[[list[PendingFence]], None] | None = None
        """Called inside each apply transaction once its effects are written and before
        its fences are checked; blocking it holds the transaction open. For
        observation: the chaos tests stop the process here to make a zombie."""
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.pending: dict[int, tuple[int, float]] = {}
        """Per partition, the offset and Kafka timestamp of the first record of the
        batch being applied: the oldest fetched record not applied yet (stall gauge)."""

    async def drain(self, timeout_s: float) -> bool:
        """Apply no new batch; wait for the one in flight. False if it outlasted ``timeout_s``.

        Called when the controller stops, before it leaves the consumer group: the
        batch being applied commits rather than being cancelled halfway (which
        would roll it back and leave its records for the next owner to apply again).
        """
        self._closing = True
        if self._idle.is_set():
            logger.info("stopping: no batch in flight")
            return True
        logger.info("stopping: finishing the batch in flight")
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        logger.info("stopping: the batch in flight is finished")
        return True

    async def apply(self, delivered: Sequence[Delivered]) -> None:
        """Apply a consumed batch in one transaction, each partition in offset order.

        One commit per batch rather than per partition: the commit's WAL flush is
        the fixed cost of a transaction, and a batch spans many partitions. Every
        partition's fence is checked inside the transaction; if one fails, the
        whole transaction rolls back and is retried without that partition. If the
        database refuses the batch for its content, each partition is applied on
        its own, split until the refused record is alone (``_isolate``).

        Never raises for what the records contain; raises only what is neither
        back-pressure nor poison (a dead-letter topic that does not acknowledge).
        """
        if self._closing:
            return  # stopping: the stored offset tells the next owner where to start
        self._idle.clear()
        try:
            await self._apply(delivered)
        finally:
            self._idle.set()

    async def _apply(self, delivered: Sequence[Delivered]) -> None:
        by_partition: dict[int, list[Delivered]] = {}
        for record in delivered:
            by_partition.setdefault(record.partition, []).append(record)
        work: dict[int, _PartitionWork] = {}
        for partition, records in by_partition.items():
            prepared = await self._prepare(partition, records)
            if prepared is not None:
                work[partition] = prepared
        started = time.perf_counter()
        prepared_work = dict(work)
        while work:
            try:
                plan = await self._apply_with_retry(work)
            except FencedError as fenced:
                lost = work.pop(fenced.partition)
                again = self._fenced(lost)
                if again is not None:
                    work[fenced.partition] = again
                continue
            except Exception as e:
                if is_back_pressure(e):
                    self._leave_moved(work)
                    continue
                logger.warning(
                    "the database refused a batch of %d records over %d partition(s) (%s); "
                    "applying each partition alone to isolate the record",
                    sum(w.records for w in work.values()),
                    len(work),
                    describe(e),
                )
                for item in sorted(work.values(), key=lambda w: w.claim.partition):
                    await self._isolate(item)
                break
            self._advance(work, plan)
            break
        self._metrics.apply_duration.observe(time.perf_counter() - started)
        self._metrics.batch_size.observe(sum(w.records for w in prepared_work.values()))
        for partition, item in sorted(prepared_work.items()):
            claim = self._ownerships.get(partition)
            self.pending.pop(partition, None)
            if item.gap_after and claim is not None and claim.next_offset == item.next_offset:
                await self._resume_at(partition, item.next_offset)

    async def _isolate(self, item: _PartitionWork) -> None:
        """Apply one partition's work in offset order, dead-lettering what the database refuses.

        Bisection: a part the database refuses is split in two, each applied in its
        own fenced transaction, until the refused record is alone; that record goes
        to the dead-letter topic and its offset is stored past it. k refused records
        among n cost about k·log2(n) extra transactions, only on this rare path.
        """
        partition = item.claim.partition
        queue = [item]  # a stack: the leftmost part on top, so offsets are applied in order
        while queue:
            part = queue.pop()
            try:
                plan = await self._apply_with_retry({partition: part})
            except FencedError:
                again = self._fenced(part)
                if again is None:
                    return
                queue = [replace(p, claim=again.claim) for p in queue]
                queue.append(again)
                continue
            except Exception as e:
                if is_back_pressure(e):
                    self._leave_moved({partition: part})
                    return
                if len(part.decoded) > 1:
                    left, right = part.split()
                    queue += [right, left]
                    continue
                if not part.decoded:
                    raise  # nothing of the records' left to blame: a fault of ours
                await self._dead_letter_refused(part.decoded[0], e)
                # The refused record is counted in the stored offset, with nothing else.
                queue.append(replace(part, decoded=[]))
                continue
            self._advance({partition: part}, plan)

    async def _dead_letter_refused(
        self, refused: Decoded | DecodedChange, error: Exception
    ) -> None:
        delivered = refused.delivered
        state = sqlstate_of(error)
        from_database = isinstance(error, DBAPIError) or state is not None
        poison = Poison(
            delivered,
            "database_refused" if from_database else "apply_error",
            describe(error),
            state,
        )
        if not from_database:
            logger.error(
                "applying %s[%d]@%d raised; dead-lettering it",
                self._ownerships.topic,
                delivered.partition,
                delivered.offset,
                exc_info=error,
            )
        await self._send_poison(poison)

    async def _send_poison(self, poison: Poison) -> None:
        await self._dead_letters.send(poison)
        self._metrics.dead_letters.labels(poison.reason).inc()
        logger.warning(
            "dead-lettered %s[%d]@%d: %s (%s)%s",
            self._ownerships.topic,
            poison.delivered.partition,
            poison.delivered.offset,
            poison.reason,
            poison.detail,
            f" SQLSTATE {poison.sqlstate}" if poison.sqlstate else "",
        )

    def _leave_moved(self, work: dict[int, _PartitionWork]) -> None:
        """Back-pressure ended because partitions changed hands: their records are the new owner's.

        ``_apply_with_retry`` retries back-pressure for as long as every partition it
        retries is still ours, so when it gives up at least one has moved.
        """
        moved = [p for p, w in work.items() if self._ownerships.get(p) != w.claim]
        if not moved:
            raise AssertionError("back-pressure retries stopped while every partition was held")
        for partition in moved:
            lost = work.pop(partition)
            logger.warning(
                "%s[%d] changed hands while the database was unavailable; "
                "left %d records to the new owner",
                lost.claim.topic,
                partition,
                lost.records,
            )

    async def _prepare(self, partition: int, records: list[Delivered]) -> _PartitionWork | None:
        """The run of records to apply for one partition, poison already dead-lettered."""
        claim = self._ownerships.get(partition)
        if claim is None:
            return None  # no longer ours: the new owner applies these
        run = self._contiguous_run(claim, records)
        if run is None:
            await self._resume_at(partition, claim.next_offset)
            return None
        if not run:
            return None
        # Records past a gap are not applied now; the consumer has already moved
        # beyond them, so after this run it must be sent back (see _resume_at).
        gap_after = any(r.offset > run[-1].offset for r in records)
        if run[0].timestamp_s is not None:
            self.pending[partition] = (run[0].offset, run[0].timestamp_s)
        decoded: list[Decoded | DecodedChange] = []
        for record in run:
            result = decode(record)
            if isinstance(result, Poison):
                await self._send_poison(result)
            else:
                decoded.append(result)
        return _PartitionWork(claim, run[0].offset, decoded, run[-1].offset + 1, gap_after)

    async def _resume_at(self, partition: int, next_offset: int) -> None:
        """Make the consumer deliver ``partition`` again from ``next_offset``, our stored offset.

        Unless Kafka no longer has that record: a position below the log start is
        reset to the log start (auto_offset_reset), so seeking back would loop, and
        going on would skip records never applied. The partition is refused instead.
        Skipped for a partition no longer held: its new owner starts at the stored offset.
        """
        if self._ownerships.get(partition) is None:
            logger.info("partition %d is no longer held; not resuming it", partition)
            return
        start = await self._source.log_start(partition)
        if start > next_offset:
            self._ownerships.refuse(partition, start)
            return
        await self._source.seek(partition, next_offset)

    async def _apply_with_retry(self, work: dict[int, _PartitionWork]) -> Plan:
        claims = {p: w.claim for p, w in work.items()}
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_back_pressure),
            wait=wait_exponential_jitter(multiplier=0.1, max=self._max_backoff_s),
            # Back-pressure lasts while we own what we are retrying.
            stop=lambda _: any(self._ownerships.get(p) != c for p, c in claims.items()),
            before_sleep=self._on_retry,
            reraise=True,
        ):
            with attempt:
                return await self._transaction(work)
        raise AssertionError("unreachable: AsyncRetrying re-raises the last error")

    def _fenced(self, lost: _PartitionWork) -> _PartitionWork | None:
        """Account for ``lost`` being fenced; return it under our newer claim if it is ours still.

        Fenced by our own newer claim: the partition came back to us in a rebalance
        while this work was prepared, and nothing was applied in between. The records
        are ours to apply under the new epoch; dropping them would make the consumer
        go back for them.
        """
        claim = lost.claim
        self._metrics.fenced_writes.inc()
        self._ownerships.release_claim(claim)
        again = self._ownerships.get(claim.partition)
        if again is not None and again.next_offset == lost.first_offset:
            logger.info(
                "the current owner of %s[%d] is this controller (epoch %d): applying them now",
                again.topic,
                again.partition,
                again.epoch,
            )
            return replace(lost, claim=again)
        logger.warning(
            "fenced: epoch %d of %s[%d] was superseded; its %d records are the current owner's",
            claim.epoch,
            claim.topic,
            claim.partition,
            lost.records,
        )
        return None

    def _advance(self, work: dict[int, _PartitionWork], plan: Plan) -> None:
        """Account for committed ``work``: stored offsets in memory, and what it applied."""
        # Wall clock on both sides: accepted_at is the API's stamp, in another process.
        committed_at = time.time()
        for partition, item in work.items():
            self._ownerships.advance(partition, item.next_offset)
        self._metrics.duplicates.inc(plan.duplicates)
        applied: dict[tuple[str, str], int] = {}
        for outcome in plan.outcomes:
            label: tuple[str, str] = (outcome.decoded.record.event.type, outcome.status)
            applied[label] = applied.get(label, 0) + 1
            self._metrics.accept_to_applied.observe(
                max(committed_at - outcome.decoded.record.accepted_at.timestamp(), 0.0)
            )
        for audit in plan.audits:
            label = ("desired_state", audit.outcome)
            applied[label] = applied.get(label, 0) + 1
        for (kind, status), count in applied.items():
            self._metrics.events_applied.labels(kind, status).inc(count)
        for reason in plan.resync_requests:
            self._metrics.resync_requests.labels(reason).inc()

    def _contiguous_run(self, claim: Claim, records: list[Delivered]) -> list[Delivered] | None:
        """The records to apply now: from the stored offset on, without gaps.

        Records below the stored offset were applied already (redelivery). Our topics
        are written without transactions, so their offsets have no gaps; a gap means
        records from before a seek, or records Kafka deleted meanwhile. A gap before
        the first record returns None; one after the run ends it (the caller then
        sends the consumer back, or refuses the partition: ``_resume_at``).
        """
        fresh = [r for r in records if r.offset >= claim.next_offset]
        skipped = len(records) - len(fresh)
        if skipped:
            self._metrics.duplicates.inc(skipped)
        if not fresh:
            return []
        if fresh[0].offset != claim.next_offset:
            logger.info(
                "%s[%d] delivered offset %d while %d is next; seeking back",
                claim.topic,
                claim.partition,
                fresh[0].offset,
                claim.next_offset,
            )
            return None
        run = [fresh[0]]
        for record in fresh[1:]:
            if record.offset != run[-1].offset + 1:
                break
            run.append(record)
        return run

    async def _transaction(self, work: dict[int, _PartitionWork]) -> Plan:
        parts = [
            BatchPart(item.claim, item.decoded, item.next_offset)
            for _, item in sorted(work.items())
        ]
        async with self._engine.begin() as conn:
            return await apply_batch(
                conn, parts, ack_timeout_s=self._ack_timeout_s, before_fence=self.before_fence
            )

    def _on_retry(self, state: RetryCallState) -> None:
        self._metrics.database_retries.inc()
        error = state.outcome.exception() if state.outcome else None
        logger.warning(
            "database unavailable (%s); retrying batch in %.1f s",
            error,
            state.next_action.sleep if state.next_action else 0.0,
        )

"""The apply pipeline: one fenced PostgreSQL transaction per partition batch.

Kafka plumbing (faust) hands in consumed records; this module filters what was
already applied, sends poison to the dead-letter topic, plans the effects and
writes them together with the partition's next offset, under the epoch fence.
Two kinds of failure, as in every stream processor worth copying:

- back-pressure: PostgreSQL unreachable. The batch is retried with capped,
  jittered backoff for as long as this controller owns the partition; nothing
  goes to the dead-letter topic and the partition does not move on;
- poison: a record that can never apply. It is dead-lettered with its reason and
  counted in the stored offset, so the partition keeps moving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

from services.controller.handlers import (
    Decoded,
    DecodedChange,
    Delivered,
    Plan,
    Poison,
    decode,
    plan_batch,
)
from services.controller.metrics import ControllerMetrics
from services.controller.ownership import (
    Claim,
    FencedError,
    advance_fenced,
    check_fenced,
    take_epoch,
)
from services.controller.store import (
    expire_commands,
    load_known_state,
    reconcile_environments,
    write_plan,
)

logger = logging.getLogger(__name__)

Seek = Callable[[int, int], Awaitable[None]]
"""Seek the consumer's position of a partition (partition, offset)."""


class DeadLetterSink(Protocol):
    async def send(self, poison: Poison) -> None:
        """Publish ``poison`` to the dead-letter topic; return only once acknowledged."""


class Ownerships:
    """The partitions this controller holds, each with its epoch and next offset.

    Backed by the ownership table: ``claim`` takes a new epoch for each partition
    not yet held. Not thread-safe; used from the controller's event loop only.
    """

    def __init__(
        self, engine: AsyncEngine, topic: str, owner: str, metrics: ControllerMetrics
    ) -> None:
        self._engine = engine
        self._topic = topic
        self._owner = owner
        self._metrics = metrics
        self._claims: dict[int, Claim] = {}
        self.refused: dict[int, str] = {}

    @property
    def topic(self) -> str:
        return self._topic

    def get(self, partition: int) -> Claim | None:
        return self._claims.get(partition)

    def held(self) -> Mapping[int, Claim]:
        return dict(self._claims)

    async def claim(
        self, partitions: Iterable[int], log_start: Mapping[int, int]
    ) -> dict[int, Claim]:
        """Take a fresh epoch for every partition not already held; return all held ones.

        A partition that never applied anything starts at Kafka's log start. One whose
        stored offset is below the log start is refused (see ``refused``): its records
        were deleted before they were applied, and starting later would lose them
        silently.
        """
        wanted = [p for p in partitions if p not in self._claims]
        if wanted:
            async with self._engine.begin() as conn:
                for partition in sorted(wanted):
                    claim = await take_epoch(conn, self._topic, partition, self._owner)
                    start = log_start.get(partition, 0)
                    if claim.next_offset == 0 and start > 0:
                        claim = replace(claim, next_offset=start)
                    elif claim.next_offset < start:
                        reason = (
                            f"stored offset {claim.next_offset} of {self._topic}[{partition}] is "
                            f"below the log start {start}: records were deleted before they "
                            "were applied; restore them or reset the offset deliberately"
                        )
                        logger.error("refusing partition: %s", reason)
                        self.refused[partition] = reason
                        continue
                    self._claims[partition] = claim
                    self.refused.pop(partition, None)
                    logger.info(
                        "claimed %s[%d] with epoch %d at offset %d",
                        self._topic,
                        partition,
                        claim.epoch,
                        claim.next_offset,
                    )
        self._metrics.owned_partitions.set(len(self._claims))
        return {p: c for p, c in self._claims.items() if p in set(partitions)}

    def release(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._claims.pop(partition, None)
            self.refused.pop(partition, None)
        self._metrics.owned_partitions.set(len(self._claims))

    def advance(self, partition: int, next_offset: int) -> None:
        claim = self._claims.get(partition)
        if claim is not None:
            self._claims[partition] = replace(claim, next_offset=next_offset)


@dataclass(frozen=True, slots=True)
class _PartitionWork:
    claim: Claim
    records: int
    """Records consumed, poison included."""
    decoded: list[Decoded | DecodedChange]
    next_offset: int


def _is_transient(error: BaseException) -> bool:
    """Database errors that mean "unavailable", not "this batch is wrong"."""
    if isinstance(error, OperationalError | InterfaceError | ConnectionError | TimeoutError):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


class Applier:
    """Applies consumed records of the partitions held in ``ownerships``."""

    def __init__(
        self,
        engine: AsyncEngine,
        ownerships: Ownerships,
        dead_letters: DeadLetterSink,
        seek: Seek,
        metrics: ControllerMetrics,
        *,
        max_backoff_s: float = 5.0,
        ack_timeout_s: float = 30.0,
    ) -> None:
        self._engine = engine
        self._ownerships = ownerships
        self._dead_letters = dead_letters
        self._seek = seek
        self._metrics = metrics
        self._max_backoff_s = max_backoff_s
        self._ack_timeout_s = ack_timeout_s

    async def apply(self, delivered: Sequence[Delivered]) -> None:
        """Apply a consumed batch in one transaction, each partition in offset order.

        One commit per batch rather than per partition: the commit's WAL flush is
        the fixed cost of a transaction, and a batch spans many partitions. Every
        partition's fence is checked inside the transaction; if one fails, the
        whole transaction rolls back and is retried without that partition.
        """
        by_partition: dict[int, list[Delivered]] = {}
        for record in delivered:
            by_partition.setdefault(record.partition, []).append(record)
        work: dict[int, _PartitionWork] = {}
        for partition, records in by_partition.items():
            prepared = await self._prepare(partition, records)
            if prepared is not None:
                work[partition] = prepared
        started = time.perf_counter()
        while work:
            try:
                plans = await self._apply_with_retry(work)
            except FencedError as fenced:
                self._fenced(work.pop(fenced.partition))
                continue
            self._record(work, plans, time.perf_counter() - started)
            return

    async def _prepare(self, partition: int, records: list[Delivered]) -> _PartitionWork | None:
        """The run of records to apply for one partition, poison already dead-lettered."""
        claim = self._ownerships.get(partition)
        if claim is None:
            return None  # no longer ours: the new owner applies these
        run = self._contiguous_run(claim, records)
        if run is None:
            await self._seek(partition, claim.next_offset)
            return None
        if not run:
            return None
        decoded: list[Decoded | DecodedChange] = []
        for record in run:
            result = decode(record)
            if isinstance(result, Poison):
                await self._dead_letters.send(result)
                self._metrics.dead_letters.labels(result.reason).inc()
                logger.warning(
                    "dead-lettered %s[%d]@%d: %s (%s)",
                    self._ownerships.topic,
                    partition,
                    record.offset,
                    result.reason,
                    result.detail,
                )
            else:
                decoded.append(result)
        return _PartitionWork(claim, len(run), decoded, run[-1].offset + 1)

    async def _apply_with_retry(self, work: dict[int, _PartitionWork]) -> dict[int, Plan]:
        claims = {p: w.claim for p, w in work.items()}
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            wait=wait_exponential_jitter(initial=0.1, max=self._max_backoff_s),
            # Back-pressure lasts while we own what we are retrying.
            stop=lambda _: any(self._ownerships.get(p) != c for p, c in claims.items()),
            before_sleep=self._on_retry,
            reraise=True,
        ):
            with attempt:
                return await self._transaction(work)
        raise AssertionError("unreachable: AsyncRetrying re-raises the last error")

    def _fenced(self, lost: _PartitionWork) -> None:
        claim = lost.claim
        self._metrics.fenced_writes.inc()
        self._ownerships.release([claim.partition])
        logger.warning(
            "fenced: epoch %d of %s[%d] was superseded; dropped %d records for the new owner",
            claim.epoch,
            claim.topic,
            claim.partition,
            lost.records,
        )

    def _record(
        self, work: dict[int, _PartitionWork], plans: dict[int, Plan], elapsed_s: float
    ) -> None:
        self._metrics.apply_duration.observe(elapsed_s)
        self._metrics.batch_size.observe(sum(w.records for w in work.values()))
        for partition, item in work.items():
            self._ownerships.advance(partition, item.next_offset)
            plan = plans[partition]
            self._metrics.duplicates.inc(plan.duplicates)
            for outcome in plan.outcomes:
                self._metrics.events_applied.labels(
                    outcome.decoded.record.event.type, outcome.status
                ).inc()
            for audit in plan.audits:
                self._metrics.events_applied.labels("desired_state", audit.outcome).inc()
            for reason in plan.resync_requests:
                self._metrics.resync_requests.labels(reason).inc()

    def _contiguous_run(self, claim: Claim, records: list[Delivered]) -> list[Delivered] | None:
        """The records to apply now: from the stored offset on, without gaps.

        Records below the stored offset were applied already (redelivery). Our topics
        are written without transactions, so their offsets have no gaps; a gap means
        records from before a seek, and the consumer must go back (returns None).
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

    async def _transaction(self, work: dict[int, _PartitionWork]) -> dict[int, Plan]:
        plans: dict[int, Plan] = {}
        async with self._engine.begin() as conn:
            for partition, item in sorted(work.items()):
                claim = item.claim
                known = await load_known_state(conn, item.decoded)
                plan = plan_batch(item.decoded, known)
                await write_plan(conn, plan, claim.epoch)
                if plan.reconcile:
                    await reconcile_environments(
                        conn,
                        plan.reconcile,
                        epoch=claim.epoch,
                        partition=partition,
                        ack_timeout_s=self._ack_timeout_s,
                    )
                await advance_fenced(conn, claim, item.next_offset)
                plans[partition] = plan
        return plans

    def _on_retry(self, state: RetryCallState) -> None:
        self._metrics.database_retries.inc()
        error = state.outcome.exception() if state.outcome else None
        logger.warning(
            "database unavailable (%s); retrying batch in %.1f s",
            error,
            state.next_action.sleep if state.next_action else 0.0,
        )


class CommandTimer:
    """Re-offers overdue commands and times out those out of attempts, per held partition."""

    def __init__(
        self,
        engine: AsyncEngine,
        ownerships: Ownerships,
        metrics: ControllerMetrics,
        *,
        ack_timeout_s: float,
        max_attempts: int,
        max_backoff_s: float = 60.0,
    ) -> None:
        self._engine = engine
        self._ownerships = ownerships
        self._metrics = metrics
        self._ack_timeout_s = ack_timeout_s
        self._max_attempts = max_attempts
        self._max_backoff_s = max_backoff_s

    async def tick(self) -> None:
        for partition, claim in sorted(self._ownerships.held().items()):
            try:
                async with self._engine.begin() as conn:
                    await check_fenced(conn, claim)
                    reoffered, timed_out = await expire_commands(
                        conn,
                        partition=partition,
                        epoch=claim.epoch,
                        ack_timeout_s=self._ack_timeout_s,
                        max_attempts=self._max_attempts,
                        max_backoff_s=self._max_backoff_s,
                    )
            except FencedError:
                self._metrics.fenced_writes.inc()
                self._ownerships.release([partition])
                continue
            except Exception as e:
                if not _is_transient(e):
                    raise
                logger.warning("command timer: database unavailable (%s); next tick retries", e)
                return
            if reoffered or timed_out:
                logger.info(
                    "%s[%d]: re-offered %d command(s), timed out %d",
                    claim.topic,
                    partition,
                    reoffered,
                    timed_out,
                )

"""The partitions this controller holds: claims taken with fresh epochs, released on revoke.

Beside ``ownership.py`` (the epoch and fence SQL): this is the controller's memory of
what it holds, backed by the ownership table, used by the consumer's rebalance
callbacks, the applier, the command timer and the ops views.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace

from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from services.controller.failures import is_back_pressure
from services.controller.metrics import ControllerMetrics
from services.controller.ownership import Claim, take_epoch
from services.shared import metrics as m

logger = logging.getLogger(__name__)


class Ownerships:
    """The partitions this controller holds, each with its epoch and next offset.

    Backed by the ownership table: ``claim`` takes a new epoch for each partition
    not yet held. Not thread-safe; used from the controller's event loop only.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        topic: str,
        owner: str,
        metrics: ControllerMetrics,
        *,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._engine = engine
        self._topic = topic
        self._owner = owner
        self._metrics = metrics
        self._max_backoff_s = max_backoff_s
        self._claims: dict[int, Claim] = {}
        # Two claims racing (a rebalance callback cancelled and run again) would
        # each take an epoch, and the later one would fence the batches of the earlier.
        self._claiming = asyncio.Lock()
        self.refused: dict[int, str] = {}
        """Partitions assigned to us that we will not apply, with the reason (``/readyz``)."""
        # Registered here rather than in ControllerMetrics: only Ownerships sets it.
        self._refused_gauge = m.gauge(metrics.registry, m.CONTROLLER_REFUSED_PARTITIONS)

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
        partitions = list(partitions)
        async with self._claiming:
            # Back-pressure, as for batches: a claim is retried while PostgreSQL is
            # unavailable (the rollback undid every epoch of the failed attempt). faust
            # cancels this wait when the group rebalances again.
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(is_back_pressure),
                wait=wait_exponential_jitter(multiplier=0.1, max=self._max_backoff_s),
                before_sleep=self._on_retry,
                reraise=True,
            ):
                with attempt:
                    await self._claim_missing(partitions, log_start)
        self._update_gauges()
        return {p: c for p, c in self._claims.items() if p in set(partitions)}

    async def _claim_missing(self, partitions: list[int], log_start: Mapping[int, int]) -> None:
        wanted = [p for p in partitions if p not in self._claims]
        if not wanted:
            return
        claimed: dict[int, Claim] = {}
        refused: dict[int, tuple[int, int]] = {}
        async with self._engine.begin() as conn:
            for partition in sorted(wanted):
                claim = await take_epoch(conn, self._topic, partition, self._owner)
                start = log_start.get(partition, 0)
                if claim.next_offset == 0 and start > 0:
                    claim = replace(claim, next_offset=start)
                elif claim.next_offset < start:
                    refused[partition] = (claim.next_offset, start)
                    continue
                claimed[partition] = claim
        # Only once committed: a claim rolled back (and retried) held nothing.
        for partition, (next_offset, start) in refused.items():
            self._refuse(partition, next_offset, start)
        for partition, claim in claimed.items():
            self._claims[partition] = claim
            self.refused.pop(partition, None)
            logger.info(
                "claimed %s[%d] with epoch %d at offset %d",
                self._topic,
                partition,
                claim.epoch,
                claim.next_offset,
            )

    def _on_retry(self, state: RetryCallState) -> None:
        self._metrics.database_retries.inc()
        error = state.outcome.exception() if state.outcome else None
        logger.warning("database unavailable (%s); retrying the claim of partitions", error)

    def refuse(self, partition: int, log_start: int) -> None:
        """Stop applying a held partition whose next record Kafka has deleted meanwhile.

        The partition stays assigned to this controller, so no other one skips the
        gap either; it waits, counted in the refused metric, for an operator.
        """
        claim = self._claims.pop(partition, None)
        if claim is not None:
            self._refuse(partition, claim.next_offset, log_start)
        self._update_gauges()

    def _refuse(self, partition: int, next_offset: int, log_start: int) -> None:
        reason = (
            f"stored offset {next_offset} of {self._topic}[{partition}] is "
            f"below the log start {log_start}: records were deleted before they "
            "were applied; restore them or reset the offset deliberately"
        )
        logger.error("refusing partition: %s", reason)
        self.refused[partition] = reason

    def release(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._claims.pop(partition, None)
            self.refused.pop(partition, None)
        self._update_gauges()

    def release_claim(self, claim: Claim) -> None:
        """Forget ``claim`` (fenced), unless the partition was claimed again since.

        A batch prepared before a rebalance can be fenced by this controller's own
        newer epoch for the same partition; that newer claim must stay.
        """
        held = self._claims.get(claim.partition)
        if held is not None and held.epoch == claim.epoch:
            self.release([claim.partition])

    def _update_gauges(self) -> None:
        self._metrics.owned_partitions.set(len(self._claims))
        self._refused_gauge.set(len(self.refused))

    def advance(self, partition: int, next_offset: int) -> None:
        claim = self._claims.get(partition)
        if claim is not None:
            self._claims[partition] = replace(claim, next_offset=next_offset)

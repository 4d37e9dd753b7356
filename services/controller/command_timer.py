"""Re-offering overdue commands and timing out those out of attempts, per held partition."""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncEngine

from services.controller.claims import Ownerships
from services.controller.failures import is_back_pressure
from services.controller.metrics import ControllerMetrics
from services.controller.ownership import FencedError, check_fenced
from services.controller.store import expire_commands

logger = logging.getLogger(__name__)


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
                self._ownerships.release_claim(claim)
                continue
            except Exception as e:
                if not is_back_pressure(e):
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

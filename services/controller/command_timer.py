"""Re-offering overdue commands and timing out those out of attempts, per held partition."""

from __future__ import annotations

import logging
from dataclasses import KW_ONLY, dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from services.controller.claims import Ownerships
from services.controller.failures import is_back_pressure
from services.controller.metrics import ControllerMetrics
from services.controller.ownership import FencedError, check_fenced
from services.controller.store import expire_commands

logger = logging.getLogger(__name__)


@dataclass
class CommandTimer:
    """Re-offers overdue commands and times out those out of attempts, per held partition."""

    engine: AsyncEngine
    ownerships: Ownerships
    metrics: ControllerMetrics
    _: KW_ONLY
    ack_timeout_s: float
    max_attempts: int
    max_backoff_s: float = 60.0

    async def tick(self) -> None:
        for partition, claim in sorted(self.ownerships.held().items()):
            try:
                async with self.engine.begin() as conn:
                    await check_fenced(conn, claim)
                    reoffered, timed_out = await expire_commands(
                        conn,
                        partition=partition,
                        epoch=claim.epoch,
                        ack_timeout_s=self.ack_timeout_s,
                        max_attempts=self.max_attempts,
                        max_backoff_s=self.max_backoff_s,
                    )
            except FencedError:
                self.metrics.fenced_writes.inc()
                self.ownerships.release_claim(claim)
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

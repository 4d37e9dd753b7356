"""Sends one batch of events until the edge accepts it, retrying the same bytes.

The batch is serialized once, before the first try, so every retry carries the
same event ids in the same order: that is what makes retrying safe (the
controller deduplicates by event id) and keeps seq order per boot.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Final

from tenacity import RetryCallState

from bench.simulator.events import Event
from bench.simulator.retry import RetryPolicy, TransientError, Verdict, parse_retry_after, verdict
from bench.simulator.stats import Stats
from bench.simulator.transport import NETWORK_ERRORS, Reply, Transport

log = logging.getLogger(__name__)

EVENTS_PATH: Final = "/v1/events"
POST_TIMEOUT_S: Final = 30.0
"""Above the edge's 10 s upstream read timeout, so the edge answers (504) first."""


class Sent(enum.Enum):
    ACCEPTED = "accepted"
    REFUSED = "refused"


class RefusedError(Exception):
    """A non-retryable answer (a 4xx other than 429, or a reply that breaks the contract)."""

    def __init__(self, kind: str, body: bytes) -> None:
        super().__init__(kind)
        self.kind = kind
        self.body = body


def should_log(stats: Stats, kind: str) -> bool:
    """Log the first few of each error kind and then one in a thousand.

    Ten thousand agents hitting the same bug must not bury the screen.
    """
    count = stats.errors[kind]
    return count <= 3 or count % 1000 == 0


def problem_text(body: bytes, limit: int = 300) -> str:
    return body[:limit].decode("utf-8", "replace").strip()


class BatchSender:
    """``POST /v1/events`` with the retry policy; counts everything in ``stats``."""

    def __init__(
        self,
        transport: Transport,
        stats: Stats,
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        label: str = "",
    ) -> None:
        self._transport = transport
        self._stats = stats
        self._policy = policy
        self._clock = clock
        self._label = label

    async def send(self, events: Sequence[Event]) -> Sent:
        """Send until accepted (ACCEPTED) or refused as a bug (REFUSED).

        Transient failures are retried without limit; cancel the task to give up,
        which counts the batch as abandoned.
        """
        body = json.dumps({"events": list(events)}, separators=(",", ":")).encode()
        try:
            await self._policy.retrying(self._count_retry)(self._post, body, len(events))
        except RefusedError as refused:
            self._stats.refused_events += len(events)
            if should_log(self._stats, refused.kind):
                log.warning(
                    "%s: batch of %d refused (%s), not retried: %s",
                    self._label,
                    len(events),
                    refused.kind,
                    problem_text(refused.body),
                )
            return Sent.REFUSED
        except asyncio.CancelledError:
            self._stats.abandoned_batches += 1
            raise
        return Sent.ACCEPTED

    async def _post(self, body: bytes, count: int) -> Reply:
        started = self._clock()
        try:
            reply = await self._transport.request(
                "POST", EVENTS_PATH, body=body, timeout_s=POST_TIMEOUT_S
            )
        except NETWORK_ERRORS as error:
            kind = f"events:{type(error).__name__}"
            self._stats.error(kind)
            raise TransientError(kind) from error
        decided = verdict(reply.status)
        if decided is Verdict.DONE:
            now = self._clock()
            self._stats.accepted(now, count, now - started)
            return reply
        kind = f"events:{reply.status}"
        self._stats.error(kind)
        if decided is Verdict.RETRY:
            raise TransientError(kind, parse_retry_after(reply.retry_after))
        raise RefusedError(kind, reply.body)

    def _count_retry(self, state: RetryCallState) -> None:
        self._stats.retries += 1

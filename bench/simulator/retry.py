"""Which answers an agent retries, and how long it waits between tries.

429, 500, 502, 503, 504 and network errors are transient: retry the same request
(for ``POST /v1/events``, the same serialized batch, so the same event ids; the
controller deduplicates them). Any other 4xx means the simulator sent something
the contract forbids: a bug, counted and logged, never retried. 500 is retried
too: an agent cannot tell a crash from a blip, and deduplication makes it safe.

The wait is AWS-style full jitter (``tenacity.wait_random_exponential``) with the
server's Retry-After as a floor, so agents spread out yet never come back sooner
than the server asked.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_random_exponential

RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S: Final = 300.0
"""A Retry-After above this is treated as this: a typo'd header must not park an agent."""


class Verdict(enum.Enum):
    DONE = "done"
    RETRY = "retry"
    BUG = "bug"


def verdict(status: int) -> Verdict:
    """DONE for 2xx, RETRY for a transient status, BUG for anything else."""
    if 200 <= status < 300:
        return Verdict.DONE
    if status in RETRY_STATUSES:
        return Verdict.RETRY
    return Verdict.BUG


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(delta, 0.0), MAX_RETRY_AFTER_S)


class TransientError(Exception):
    """A try that should be repeated: ``kind`` is the status or exception class name."""

    def __init__(self, kind: str, retry_after_s: float | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RetryPolicy:
    """Full-jitter exponential backoff with a Retry-After floor; retries until cancelled.

    There is no attempt limit: an agent's events must get through eventually, and
    the simulator stops a retry loop by cancelling its task at shutdown.
    """

    multiplier_s: float = 0.25
    max_s: float = 30.0
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def wait_s(self, state: RetryCallState) -> float:
        jitter = wait_random_exponential(multiplier=self.multiplier_s, max=self.max_s)(state)
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, TransientError) and error.retry_after_s is not None:
            return max(jitter, error.retry_after_s)
        return jitter

    def retrying(
        self, before_sleep: Callable[[RetryCallState], None] | None = None
    ) -> AsyncRetrying:
        """A tenacity controller that retries TransientError and lets anything else out."""
        return AsyncRetrying(
            sleep=self.sleep,
            wait=self.wait_s,
            retry=retry_if_exception_type(TransientError),
            before_sleep=before_sleep,
            reraise=True,
        )

"""Bounded in-flight work per process, with a short bounded wait for a slot; then 503.

An aiohttp process offered more than it can carry otherwise takes every request
on and lets them queue for the event loop, the database pool or Kafka until the
edge's read timeout fires (504) on requests it had already paid for. Here each
lane admits ``limit`` requests at once; one more waits for a slot, in arrival
order, at most ``queue_s`` (and no more than ``max_waiting`` wait), and is
answered 503 with Retry-After and a problem the agent knows to retry when none
frees in time. A burst (every agent of an environment answering a command at
once) is absorbed as a second of latency; overload that lasts is shed within
``queue_s``, long before any timeout, and the admitted requests keep their
latency.

Requests are sorted into lanes by a classifier the service supplies (for the
API: event accepts, long polls, everything else), each lane with its own limit,
so a thousand agents holding long polls open never take an event accept's
place. A request the classifier returns ``None`` for (health, metrics) is never
counted nor refused.

The shed answer is built here, not raised as a ``Problem``: the services' error
middlewares log each 5xx problem, and a log line per shed request would spend
the CPU the shedding is meant to save. The count is in each service's request
metric (status 503 of the route).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from services.shared.problems import PROBLEM_CONTENT_TYPE, TYPE_PREFIX

log = logging.getLogger(__name__)

OVERLOADED_TYPE: Final = TYPE_PREFIX + "overloaded"
LOG_EVERY_S: Final = 5.0
"""At most one warning per lane and this many seconds while a lane sheds."""

Classifier = Callable[[web.Request], str | None]


@dataclass(frozen=True)
class LaneLimit:
    """How many requests of a lane run at once, and how a request waits for a slot."""

    limit: int
    queue_s: float = 0.0
    """Longest wait for a slot; 0: refused at once when the lane is full."""
    max_waiting: int = 0
    """Most requests waiting at once; beyond it, refused at once."""


@dataclass
class Lane:
    """One class of requests: its limits, and how many run and wait now."""

    name: str
    limit: int
    queue_s: float = 0.0
    max_waiting: int = 0
    in_flight: int = 0
    shed: int = 0
    logged_at: float = field(default=float("-inf"), repr=False)
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque, repr=False)

    async def enter(self) -> bool:
        """Take a slot, waiting for one up to ``queue_s``; False when none came."""
        if self.in_flight < self.limit and not self.waiters:
            self.in_flight += 1
            return True
        if self.queue_s <= 0 or len(self.waiters) >= self.max_waiting:
            return False
        slot = asyncio.get_running_loop().create_future()
        self.waiters.append(slot)
        try:
            async with asyncio.timeout(self.queue_s):
                await slot
        except TimeoutError:
            self._abandon(slot)
            return False
        except BaseException:
            self._abandon(slot)
            raise
        return True

    def _abandon(self, slot: asyncio.Future[None]) -> None:
        """A waiter stops waiting (its time is up, or its request was cancelled)."""
        if slot.done() and not slot.cancelled():
            # Handed a slot just as the wait ended: pass it on.
            self.leave()
        elif slot in self.waiters:
            # Not when a slot freed after the wait was cancelled: leave() skipped
            # the cancelled waiter and took it off already.
            self.waiters.remove(slot)

    def leave(self) -> None:
        """Give the slot to the longest waiter still waiting, or free it."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1


class Admission:
    """Counts requests in flight per lane; ``middleware`` refuses those over the limit.

    Single event loop, no awaits between a check and its increment, so no lock is
    needed; a freed slot passes straight to the longest waiter. ``retry_after_s``
    is the Retry-After of a shed answer: short, because overload passes quickly
    once agents back off with jitter.
    """

    def __init__(
        self,
        classify: Classifier,
        limits: Mapping[str, int | LaneLimit],
        *,
        retry_after_s: int = 1,
    ) -> None:
        lanes = {
            name: limit if isinstance(limit, LaneLimit) else LaneLimit(limit)
            for name, limit in limits.items()
        }
        if any(lane.limit < 1 or lane.queue_s < 0 for lane in lanes.values()):
            raise ValueError(f"every lane needs a limit of at least 1: {dict(limits)}")
        self._classify = classify
        self.lanes = {
            name: Lane(name, lane.limit, lane.queue_s, lane.max_waiting)
            for name, lane in lanes.items()
        }
        self._retry_after = str(retry_after_s)

    def refusal(self, lane: Lane) -> web.Response:
        body = {
            "type": OVERLOADED_TYPE,
            "title": "Overloaded",
            "status": 503,
            "detail": f"more {lane.name} requests are in flight than this process serves "
            "at once, and none finished in time; retry after the Retry-After seconds, "
            "with jitter",
        }
        return web.Response(
            status=503,
            text=json.dumps(body),
            content_type=PROBLEM_CONTENT_TYPE,
            headers={"Retry-After": self._retry_after},
        )

    @property
    def middleware(self) -> Middleware:
        @web.middleware
        async def admission_middleware(
            request: web.Request, handler: Handler
        ) -> web.StreamResponse:
            name = self._classify(request)
            if name is None:
                return await handler(request)
            lane = self.lanes[name]
            if not await lane.enter():
                lane.shed += 1
                now = time.monotonic()
                if now - lane.logged_at >= LOG_EVERY_S:
                    lane.logged_at = now
                    log.warning(
                        "shedding %s requests: %d in flight (limit %d), %d waiting, %d shed so far",
                        lane.name,
                        lane.in_flight,
                        lane.limit,
                        len(lane.waiters),
                        lane.shed,
                    )
                return self.refusal(lane)
            try:
                return await handler(request)
            finally:
                lane.leave()

        return admission_middleware

"""Bounded in-flight work per process: over a lane's limit, 503 with Retry-After at once.

An aiohttp process offered more than it can carry otherwise takes every request
on and lets them queue for the event loop, the database pool or Kafka until the
edge's read timeout fires (504) on requests it had already paid for. Shedding at
the door instead answers the excess in microseconds with a problem the agent
knows to retry, and the requests that were admitted keep their latency.

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

import json
import logging
import time
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


@dataclass
class Lane:
    """One class of requests: how many may be in flight at once, and how many are."""

    name: str
    limit: int
    in_flight: int = 0
    shed: int = 0
    logged_at: float = field(default=float("-inf"), repr=False)


class Admission:
    """Counts requests in flight per lane; ``middleware`` refuses those over the limit.

    Single event loop, no awaits between the check and the increment, so no lock
    is needed. ``retry_after_s`` is the Retry-After of a shed answer: short,
    because overload passes quickly once agents back off with jitter.
    """

    def __init__(
        self,
        classify: Classifier,
        limits: Mapping[str, int],
        *,
        retry_after_s: int = 1,
    ) -> None:
        if any(limit < 1 for limit in limits.values()):
            raise ValueError(f"every lane needs a limit of at least 1: {dict(limits)}")
        self._classify = classify
        self.lanes = {name: Lane(name, limit) for name, limit in limits.items()}
        self._retry_after = str(retry_after_s)

    def refusal(self, lane: Lane) -> web.Response:
        body = {
            "type": OVERLOADED_TYPE,
            "title": "Overloaded",
            "status": 503,
            "detail": f"more {lane.name} requests are in flight than this process serves "
            "at once; retry after the Retry-After seconds, with jitter",
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
            if lane.in_flight >= lane.limit:
                lane.shed += 1
                now = time.monotonic()
                if now - lane.logged_at >= LOG_EVERY_S:
                    lane.logged_at = now
                    log.warning(
                        "shedding %s requests: %d in flight (limit %d), %d shed so far",
                        lane.name,
                        lane.in_flight,
                        lane.limit,
                        lane.shed,
                    )
                return self.refusal(lane)
            lane.in_flight += 1
            try:
                return await handler(request)
            finally:
                lane.in_flight -= 1

        return admission_middleware

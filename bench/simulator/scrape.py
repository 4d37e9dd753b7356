"""Applied events/s from the controllers' own Prometheus counters.

``fleetplane_controller_events_applied_total{type, status}`` counts every agent
event a controller recorded, applied or rejected. The simulator scrapes each
``--controller-metrics`` URL about once a second and turns the summed counter
into a rate. A controller restart resets its counter; ``CounterAccumulator``
treats a drop as a reset (as Prometheus' ``rate()`` does) so the sum only grows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from prometheus_client.parser import text_string_to_metric_families

from bench.simulator.stats import Stats
from bench.simulator.transport import NETWORK_ERRORS, Transport

log = logging.getLogger(__name__)

APPLIED_SAMPLE: Final = "fleetplane_controller_events_applied_total"
SCRAPE_EVERY_S: Final = 1.0
SCRAPE_TIMEOUT_S: Final = 5.0


def applied_totals(text: str) -> dict[str, float]:
    """Sum of the applied-events counter by its ``status`` label (applied, rejected).

    Raises ValueError when the text is not Prometheus exposition format.
    """
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == APPLIED_SAMPLE:
                status = sample.labels.get("status", "")
                totals[status] = totals.get(status, 0.0) + sample.value
    return totals


@dataclass
class CounterAccumulator:
    """Growth of one counter since the first reading, surviving resets."""

    last: float | None = None
    growth: float = 0.0

    def observe(self, value: float) -> None:
        if self.last is not None:
            # A drop means the process restarted from zero: all of `value` is new.
            self.growth += value - self.last if value >= self.last else value
        self.last = value


async def scrape_loop(
    urls: Sequence[str],
    transport: Transport,
    stats: Stats,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Scrape until cancelled; a failing URL is counted and keeps its last reading."""
    applied = {url: CounterAccumulator() for url in urls}
    rejected = {url: CounterAccumulator() for url in urls}
    while True:
        answered = False
        for url in urls:
            try:
                reply = await transport.request("GET", url, timeout_s=SCRAPE_TIMEOUT_S)
                if reply.status != 200:
                    raise ValueError(f"HTTP {reply.status}")
                totals = applied_totals(reply.body.decode("utf-8", "replace"))
            except (*NETWORK_ERRORS, ValueError) as error:
                kind = f"metrics:{type(error).__name__}"
                stats.error(kind)
                if stats.errors[kind] <= 3:
                    log.warning("scraping %s failed: %s", url, error)
                continue
            applied[url].observe(totals.get("applied", 0.0))
            rejected[url].observe(totals.get("rejected", 0.0))
            answered = True
        if answered:
            now = clock()
            stats.metrics_applied.observe(now, sum(a.growth for a in applied.values()))
            stats.metrics_rejected.observe(now, sum(r.growth for r in rejected.values()))
        await asyncio.sleep(SCRAPE_EVERY_S)

"""Counters, rates and latency quantiles shared by all agents of one run.

Everything runs on one event loop, so plain attributes need no locks. Times are
``time.monotonic()`` seconds, passed in by the caller, which keeps these classes
deterministic under test.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

RATE_WINDOW_S: Final = 10.0
RESERVOIR: Final = 100_000
"""Latency samples kept for whole-run quantiles; beyond this, reservoir sampling
keeps a uniform sample so memory stays flat on long runs."""


def quantile(samples: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile: the smallest sample with at least ``q`` of all at or below it.

    None for no samples. Nearest rank always returns an observed value, which is
    what a latency p99 should be (no interpolation between two requests).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


class LatencyRecorder:
    """Whole-run reservoir plus the last ``window_s`` of samples for the live screen."""

    def __init__(
        self, rng: random.Random, capacity: int = RESERVOIR, window_s: float = RATE_WINDOW_S
    ) -> None:
        self._rng = rng
        self._capacity = capacity
        self._window_s = window_s
        self.count = 0
        self._reservoir: list[float] = []
        self._recent: deque[tuple[float, float]] = deque()

    def add(self, now: float, seconds: float) -> None:
        self.count += 1
        if len(self._reservoir) < self._capacity:
            self._reservoir.append(seconds)
        else:
            # Algorithm R: each of the `count` samples is kept with equal probability.
            slot = self._rng.randrange(self.count)
            if slot < self._capacity:
                self._reservoir[slot] = seconds
        self._recent.append((now, seconds))
        self._trim(now)

    def quantiles_ms(self, now: float | None = None) -> dict[str, float | None]:
        """p50 and p99 in milliseconds: of the last window when ``now`` is given, else all."""
        if now is None:
            values: Sequence[float] = self._reservoir
        else:
            self._trim(now)
            values = [v for _, v in self._recent]
        return {"p50": _ms(quantile(values, 0.5)), "p99": _ms(quantile(values, 0.99))}

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] <= now - self._window_s:
            self._recent.popleft()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


class WindowedRate:
    """Events per second over the last ``window_s`` seconds, in one-second buckets."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self._window_s = window_s
        self._buckets: deque[list[float]] = deque()  # [second, count]
        self._started: float | None = None

    def add(self, now: float, count: float = 1.0) -> None:
        if self._started is None:
            self._started = now
        second = math.floor(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += count
        else:
            self._buckets.append([second, count])
        self._trim(now)

    def start(self, now: float) -> None:
        """Start the clock without an event, so a quiet start counts as a low rate."""
        if self._started is None:
            self._started = now

    def rate(self, now: float) -> float:
        """Per second over the window, or over the time since start when that is shorter."""
        if self._started is None:
            return 0.0
        self._trim(now)
        span = min(self._window_s, now - self._started)
        if span <= 0:
            return 0.0
        return sum(count for _, count in self._buckets) / span

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - self._window_s:
            self._buckets.popleft()


@dataclass
class MetricsRate:
    """``fleetplane_controller_events_applied_total`` summed over the scraped controllers."""

    first: tuple[float, float] | None = None  # (time, total)
    history: deque[tuple[float, float]] = field(default_factory=deque)

    def observe(self, now: float, total: float) -> None:
        if self.first is None:
            self.first = (now, total)
        self.history.append((now, total))
        while len(self.history) > 1 and self.history[0][0] < now - RATE_WINDOW_S:
            self.history.popleft()

    def rate(self) -> float | None:
        """Per second over the recent window; None until two scrapes arrived."""
        if len(self.history) < 2:
            return None
        (t0, v0), (t1, v1) = self.history[0], self.history[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else None

    def average(self) -> float | None:
        """Per second since the first scrape of the run."""
        if self.first is None or not self.history:
            return None
        (t0, v0), (t1, v1) = self.first, self.history[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else None


class Stats:
    """Everything the live screen and the final report show."""

    def __init__(self, started: float, rng: random.Random | None = None) -> None:
        rng = rng or random.Random()
        self.started = started
        self.agents_running = 0
        self.events_accepted = 0
        self.batches_accepted = 0
        self.retries = 0
        self.poll_retries = 0
        self.abandoned_batches = 0
        self.refused_events = 0
        self.accepted_rate = WindowedRate()
        self.post_latency = LatencyRecorder(rng)
        # Sampled events followed to the controller's verdict.
        self.samples_tracked = 0
        self.samples_applied = 0
        self.samples_rejected = 0
        self.samples_timed_out = 0
        self.sample_done_rate = WindowedRate()
        self.apply_latency = LatencyRecorder(rng)
        self.metrics_applied = MetricsRate()
        self.metrics_rejected = MetricsRate()
        self.commands: Counter[str] = Counter()
        self.newest_epoch: int | None = None
        self.errors: Counter[str] = Counter()
        self.ownership: dict[str, Any] | None = None
        """The last partition ownership read from a controller's /status."""
        self.accepted_rate.start(started)
        self.sample_done_rate.start(started)

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def accepted(self, now: float, events: int, latency_s: float) -> None:
        self.events_accepted += events
        self.batches_accepted += 1
        self.accepted_rate.add(now, events)
        self.post_latency.add(now, latency_s)

    def sample_done(self, now: float, status: str, latency_s: float) -> None:
        if status == "applied":
            self.samples_applied += 1
        else:
            self.samples_rejected += 1
        self.sample_done_rate.add(now)
        self.apply_latency.add(now, latency_s)

    def saw_epoch(self, epoch: int) -> None:
        self.newest_epoch = epoch if self.newest_epoch is None else max(self.newest_epoch, epoch)

    def sample_fraction(self) -> float | None:
        if self.events_accepted == 0 or self.samples_tracked == 0:
            return None
        return self.samples_tracked / self.events_accepted

    def applied_rates(self, now: float) -> tuple[str, float | None, float | None]:
        """(source, per second now, per second over the run) of controller-applied events.

        Controller metrics count every event the controllers apply (all agents, not
        only ours) but exactly; the sampled estimate scales followed samples by the
        sampling fraction and covers only events the controller has finished.
        """
        if self.metrics_applied.first is not None:
            return "metrics", self.metrics_applied.rate(), self.metrics_applied.average()
        fraction = self.sample_fraction()
        if fraction is None:
            return "samples", None, None
        elapsed = now - self.started
        done = self.samples_applied + self.samples_rejected
        average = done / fraction / elapsed if elapsed > 0 else None
        return "samples", self.sample_done_rate.rate(now) / fraction, average

    def snapshot(self, now: float, *, recent: bool) -> dict[str, Any]:
        """A JSON-ready summary; ``recent`` picks windowed latencies (live) over whole-run."""
        elapsed = now - self.started
        window = now if recent else None
        source, applied_now, applied_avg = self.applied_rates(now)
        return {
            "elapsed_s": round(elapsed, 1),
            "agents_running": self.agents_running,
            "events": {
                "accepted": self.events_accepted,
                "batches_accepted": self.batches_accepted,
                "accepted_per_s_now": round(self.accepted_rate.rate(now), 1),
                "accepted_per_s_avg": round(self.events_accepted / elapsed, 1)
                if elapsed > 0
                else 0,
                "retries": self.retries,
                "abandoned_batches": self.abandoned_batches,
                "refused_events": self.refused_events,
                "post_latency_ms": self.post_latency.quantiles_ms(window),
            },
            "applied": {
                "source": source,
                "per_s_now": _round(applied_now),
                "per_s_avg": _round(applied_avg),
                "samples_tracked": self.samples_tracked,
                "samples_applied": self.samples_applied,
                "samples_rejected": self.samples_rejected,
                "samples_timed_out": self.samples_timed_out,
                "accept_to_applied_ms": self.apply_latency.quantiles_ms(window),
                "metrics_rejected_per_s_avg": _round(self.metrics_rejected.average()),
            },
            "commands": {
                "delivered": self.commands["delivered"],
                "applied": self.commands["applied"],
                "failed": self.commands["failed"],
                "stale_epoch_ignored": self.commands["stale_epoch_ignored"],
                "duplicate_ignored": self.commands["duplicate_ignored"],
                "poll_retries": self.poll_retries,
                "newest_epoch": self.newest_epoch,
            },
            "errors": dict(sorted(self.errors.items())),
            "ownership": self.ownership,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)

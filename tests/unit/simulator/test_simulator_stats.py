"""Quantiles, rates and the controller-metrics parsing behind the report."""

from __future__ import annotations

import random

import pytest

from bench.simulator.scrape import CounterAccumulator, applied_totals
from bench.simulator.stats import LatencyRecorder, MetricsRate, Stats, WindowedRate, quantile


def test_quantile_is_nearest_rank() -> None:
    samples = [float(n) for n in range(1, 101)]
    random.Random(3).shuffle(samples)
    assert quantile(samples, 0.5) == 50.0
    assert quantile(samples, 0.99) == 99.0
    assert quantile(samples, 1.0) == 100.0
    assert quantile(samples, 0.0) == 1.0
    assert quantile([7.0], 0.99) == 7.0
    # Ranks are rounded up, never to nearest: p99 of 150 is the 149th (ceil 148.5).
    assert quantile([float(n) for n in range(1, 151)], 0.99) == 149.0
    assert quantile([float(n) for n in range(1, 11)], 0.51) == 6.0
    assert quantile([], 0.5) is None


def test_quantile_p99_sees_the_tail() -> None:
    samples = [0.01] * 98 + [5.0, 9.0]
    assert quantile(samples, 0.5) == 0.01
    assert quantile(samples, 0.99) == 5.0


def test_quantile_rejects_a_bad_q() -> None:
    with pytest.raises(ValueError, match="quantile"):
        quantile([1.0], 1.5)


def test_latency_recorder_reports_milliseconds_overall_and_recent() -> None:
    recorder = LatencyRecorder(random.Random(1), window_s=10.0)
    for n in range(100):
        recorder.add(now=float(n), seconds=0.001 * (n + 1))
    assert recorder.quantiles_ms() == {"p50": 50.0, "p99": 99.0}
    # Only samples 90..99 (seconds 0.091..0.100) are within the last 10 s.
    assert recorder.quantiles_ms(now=99.5) == {"p50": 95.0, "p99": 100.0}


def test_latency_reservoir_stays_bounded() -> None:
    recorder = LatencyRecorder(random.Random(1), capacity=50)
    for n in range(10_000):
        recorder.add(float(n), 1.0)
    assert recorder.count == 10_000
    assert len(recorder._reservoir) == 50


def test_windowed_rate() -> None:
    rate = WindowedRate(window_s=10.0)
    rate.start(0.0)
    assert rate.rate(0.0) == 0.0
    for second in range(20):
        rate.add(float(second) + 0.5, 30)
    # Last 10 s hold 10 buckets of 30 events.
    assert rate.rate(19.9) == pytest.approx(30.0)
    # Early on, the rate is over the time since start, not the whole window.
    early = WindowedRate(window_s=10.0)
    early.start(0.0)
    early.add(0.5, 10)
    early.add(1.5, 10)
    assert early.rate(2.0) == pytest.approx(10.0)


def test_metrics_rate_recent_and_average() -> None:
    rate = MetricsRate()
    assert rate.rate() is None
    rate.observe(0.0, 0.0)
    assert rate.rate() is None
    for second in range(1, 31):
        rate.observe(float(second), 100.0 * second if second <= 20 else 2000.0 + 10 * (second - 20))
    assert rate.rate() == pytest.approx(10.0)
    assert rate.average() == pytest.approx(2100.0 / 30.0)


def test_applied_rate_prefers_metrics_over_samples() -> None:
    stats = Stats(0.0)
    stats.accepted(1.0, 200, 0.01)
    stats.samples_tracked = 10
    for n in range(10):
        stats.sample_done(1.0 + n * 0.1, "applied", 0.2)
    source, _now, average = stats.applied_rates(10.0)
    # 10 of 200 events followed (1 in 20): 10 done -> ~200 applied over 10 s.
    assert source == "samples"
    assert average == pytest.approx(20.0)
    stats.metrics_applied.observe(5.0, 0.0)
    stats.metrics_applied.observe(10.0, 500.0)
    assert stats.applied_rates(10.0) == ("metrics", 100.0, 100.0)


def test_snapshot_is_json_ready() -> None:
    stats = Stats(0.0)
    stats.accepted(1.0, 3, 0.004)
    stats.error("events:503")
    snapshot = stats.snapshot(2.0, recent=False)
    assert snapshot["events"]["accepted"] == 3
    assert snapshot["events"]["post_latency_ms"] == {"p50": 4.0, "p99": 4.0}
    assert snapshot["errors"] == {"events:503": 1}


EXPOSITION = """\
# HELP fleetplane_controller_events_applied_total Agent events recorded.
# TYPE fleetplane_controller_events_applied_total counter
fleetplane_controller_events_applied_total{type="heartbeat",status="applied"} 120.0
fleetplane_controller_events_applied_total{type="observed_state",status="applied"} 30.0
fleetplane_controller_events_applied_total{type="heartbeat",status="rejected"} 2.0
fleetplane_controller_events_applied_created{type="heartbeat",status="applied"} 1.7e9
# HELP other_total Something else.
# TYPE other_total counter
other_total 99.0
"""


def test_applied_totals_sum_by_status() -> None:
    assert applied_totals(EXPOSITION) == {"applied": 150.0, "rejected": 2.0}
    assert applied_totals("") == {}


def test_counter_accumulator_survives_a_restart() -> None:
    counter = CounterAccumulator()
    for value in (100.0, 150.0, 20.0, 50.0):
        counter.observe(value)
    # +50, then a reset to 0 and +20, then +30.
    assert counter.growth == 100.0

"""The ceiling bench's histogram medians and workloads (pure logic)."""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bench.ceiling import histogram_median, mixed


def exposition(values: list[float], buckets: tuple[float, ...]) -> str:
    registry = CollectorRegistry()
    histogram = Histogram("sizes", "sizes", registry=registry, buckets=buckets)
    for value in values:
        histogram.observe(value)
    return generate_latest(registry).decode()


def test_the_median_is_interpolated_inside_its_bucket_as_promql_does() -> None:
    # 10 observations: 2 in (0, 100], 8 in (100, 500]; rank 5 is the third of 8 in (100, 500].
    text = exposition([50.0, 60.0] + [400.0] * 8, (100, 500, 1000))
    assert histogram_median(text, "sizes") == 100 + 400 * 3 / 8


def test_no_observations_has_no_median() -> None:
    assert histogram_median(exposition([], (1, 2)), "sizes") is None


def test_the_mixed_workload_holds_the_mix_and_every_customers_sequence_in_order() -> None:
    workload = mixed(2000, 50)
    kinds = Counter(record["event"]["type"] for _, record in workload)
    assert kinds == {"heartbeat": 1600, "observed_state": 300, "command_result": 100}
    seqs: dict[str, list[int]] = {}
    for customer, record in workload:
        seqs.setdefault(customer, []).append(record["event"]["seq"])
    assert all(s == list(range(1, 41)) for s in seqs.values())
    assert len(seqs) == 50

"""The fleetplane_environments gauge's values: owned customers only, every state present."""

from __future__ import annotations

from services.controller.ops import (
    LIVENESS_STATES,
    CustomerPartitions,
    liveness_of_owned,
    partition_of,
)

PARTITIONS = 4


def customer_on(partition: int, prefix: str) -> str:
    return next(
        f"{prefix}-{i}"
        for i in range(1000)
        if partition_of(f"{prefix}-{i}", PARTITIONS) == partition
    )


def test_only_customers_of_owned_partitions_are_exported_with_every_state() -> None:
    mine, theirs = customer_on(1, "mine"), customer_on(2, "theirs")
    counts = [
        (mine, "connected", 3),
        (mine, "lost", 1),
        (theirs, "connected", 5),
    ]
    gauges = liveness_of_owned(counts, [0, 1], PARTITIONS, CustomerPartitions())
    assert gauges == {
        (mine, "connected"): 3,
        (mine, "unknown"): 0,
        (mine, "lost"): 1,
        (mine, "never_seen"): 0,
    }
    assert {state for _, state in gauges} == set(LIVENESS_STATES)


def test_a_customer_is_exported_by_exactly_one_owner_of_a_split_group() -> None:
    customers = [f"c{i}" for i in range(40)]
    counts = [(c, "connected", 1) for c in customers]
    known = CustomerPartitions()
    one = liveness_of_owned(counts, [0, 1], PARTITIONS, known)
    other = liveness_of_owned(counts, [2, 3], PARTITIONS, known)
    assert not one.keys() & other.keys()
    assert sum(one.values()) + sum(other.values()) == len(customers)


def test_nothing_owned_exports_nothing() -> None:
    assert liveness_of_owned([("c", "connected", 1)], [], PARTITIONS, CustomerPartitions()) == {}

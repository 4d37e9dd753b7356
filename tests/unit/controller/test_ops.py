"""The ops tools' logic without Kafka or PostgreSQL: partitioning, lag, rendering, CLI."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.controller.__main__ import _parser, _with_default_command
from services.controller.dead_letters import DeadLetter, parse_letter_id, replay, verdict
from services.controller.metrics import ControllerMetrics
from services.controller.ops import (
    CustomerPartitions,
    CustomerStatus,
    PartitionStatus,
    StallTracker,
    StatusReport,
    partition_of,
    render,
)
from services.controller.ops_web import update_lag
from services.controller.ownership import Claim
from services.controller.retention import retention_problem

# Kafka's own test vectors for murmur2 (clients/src/test/.../utils/UtilsTest.java,
# testMurmur2): the Java producer puts a key in toPositive(murmur2(key)) % n.
JAVA_MURMUR2 = {
    "21": -973932308,
    "foobar": -790332482,
    "a-little-bit-long-string": -985981536,
    "a-little-bit-longer-string": -1486304829,
    "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    "abc": 479470107,
}


@pytest.mark.parametrize(("key", "java_hash"), sorted(JAVA_MURMUR2.items()))
def test_a_customers_partition_is_the_java_producers(key: str, java_hash: int) -> None:
    for partitions in (1, 12, 48, 1000):
        assert partition_of(key, partitions) == (java_hash & 0x7FFFFFFF) % partitions


def test_customer_counts_follow_the_partition_count() -> None:
    cache = CustomerPartitions()
    customers = [f"cust-{i}" for i in range(200)]
    counts = cache.count(customers, 12)
    assert sum(counts.values()) == 200
    assert counts == cache.count(customers, 12)  # cached answers are the same answers
    for customer in customers[:20]:
        assert counts[partition_of(customer, 12)] >= 1
    # After partitions are added a customer may live elsewhere: the count is per count.
    assert sum(cache.count(customers, 48).values()) == 200
    assert max(cache.count(customers, 48)) < 48


def claim(partition: int, next_offset: int) -> Claim:
    return Claim("events", partition, epoch=7, next_offset=next_offset)


def lag_samples(metrics: ControllerMetrics) -> dict[str, float]:
    return {
        s.labels["partition"]: s.value
        for family in metrics.registry.collect()
        if family.name == "fleetplane_controller_partition_lag"
        for s in family.samples
    }


def test_lag_gauge_covers_held_partitions_only() -> None:
    metrics = ControllerMetrics()
    ends = {0: 120, 1: 50, 2: None}
    exported = update_lag(
        metrics, {0: claim(0, 100), 1: claim(1, 50), 2: claim(2, 0)}, ends.get, set()
    )
    # Partition 2 has not been fetched yet: no guess is exported.
    assert lag_samples(metrics) == {"0": 20.0, "1": 0.0}
    assert exported == {0, 1}

    # Partition 0 moved to another controller: its owner exports it now, we must not.
    exported = update_lag(metrics, {1: claim(1, 40)}, ends.get, exported)
    assert lag_samples(metrics) == {"1": 10.0}
    assert exported == {1}


T = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def partition_row(partition: int, owner: str | None, lag: int, **kw: Any) -> PartitionStatus:
    return PartitionStatus(
        partition=partition,
        owner=owner,
        epoch=None if owner is None else 10 + partition,
        stored_offset=None if owner is None else 100,
        log_start=0,
        log_end=100 + lag,
        lag=lag,
        customers=2,
        events_per_s=3.5,
        assigned_at=None if owner is None else T - timedelta(seconds=90),
        updated_at=None if owner is None else T - timedelta(seconds=1),
        **kw,
    )


def test_report_renders_every_partition_and_the_customer() -> None:
    report = StatusReport(
        "fleetplane.events",
        T,
        10.0,
        [
            partition_row(0, "controller-1", 0),
            partition_row(1, "controller-2", 5, problem="stored offset 3 is below the log start 9"),
            partition_row(2, None, 7),
        ],
        CustomerStatus("acme", 1, "controller-2", 11, 5, 3),
    )
    text = render(report)
    assert text.splitlines()[0].startswith("fleetplane.events: 3 partitions, 2 owner(s), lag 12")
    assert "10.5 events/s" in text
    lines = {line.split()[0]: line.split() for line in text.splitlines()[2:5]}
    assert lines["0"][:6] == ["0", "controller-1", "10", "100", "100", "0"]
    assert lines["2"][:6] == ["2", "-", "-", "-", "107", "7"]
    assert "! partition 1: stored offset 3 is below the log start 9" in text
    assert "customer acme: partition 1, owner controller-2 (epoch 11), lag 5" in text

    body = json.loads(json.dumps(report.to_json()))
    assert body["owners"] == {"controller-1": [0], "controller-2": [1]}
    assert body["total_lag"] == 12
    assert body["customer"]["partition"] == 1
    assert body["partitions"][0]["assigned_at"] == "2026-11-27T11:58:30+00:00"


def test_record_retention_must_outlast_the_topics() -> None:
    week_ms = 7 * 24 * 3600 * 1000
    assert retention_problem(14 * 24 * 3600, week_ms) is None
    problem = retention_problem(7 * 24 * 3600, week_ms)
    assert problem is not None
    assert "FLEETPLANE_CONTROLLER_RECORD_RETENTION_S" in problem
    assert retention_problem(3600, 3600 * 1000 + 1) is not None
    # Kept forever: no window can outlast it; the caller warns instead of refusing.
    assert retention_problem(60, None) is None


def parse(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(_with_default_command(list(argv)))


def test_bare_options_still_run_a_controller() -> None:
    # infra/local/services.sh and the test harness start controllers this way.
    args = parse("--web-port", "18091", "--instance-id", "controller-1")
    assert args.handler.__name__ == "_run"
    assert (args.web_port, args.instance_id) == (18091, "controller-1")
    assert parse().handler.__name__ == "_run"
    assert parse("run", "--web-port", "1").web_port == 1


def test_tool_commands_parse() -> None:
    status = parse("status", "--customer", "acme", "--watch", "--json")
    assert (status.handler.__name__, status.customer, status.watch, status.json) == (
        "_status",
        "acme",
        2.0,
        True,
    )
    assert parse("status").watch is None
    assert parse("dead-letters", "inspect", "--limit", "5").limit == 5
    replay_args = parse("dead-letters", "replay", "--offset", "3", "--offset", "0:4")
    assert replay_args.offset == ["3", "0:4"]
    with pytest.raises(SystemExit):
        parse("dead-letters", "replay", "--all", "--offset", "3")
    with pytest.raises(SystemExit):
        parse("dead-letters", "replay")


def letter(value: bytes | None, *, key: bytes = b"acme", offset: int = 4) -> DeadLetter:
    return DeadLetter(
        topic="events.dlq",
        partition=0,
        offset=offset,
        timestamp_ms=1_800_000_000_000,
        key=key,
        value=value,
        headers={
            "fleetplane-dlq-reason": b"invalid",
            "fleetplane-dlq-detail": b"event.payload.agent_version: String should match",
            "fleetplane-source-topic": b"events",
            "fleetplane-source-partition": b"2",
            "fleetplane-source-offset": b"17",
        },
    )


def agent_event(version: str, customer: str = "acme") -> bytes:
    return json.dumps(
        {
            "schema_version": 1,
            "kind": "agent_event",
            "customer_id": customer,
            "environment_id": "prod",
            "agent_id": "agent-1",
            "accepted_at": T.isoformat(),
            "event": {
                "id": "ev-1",
                "boot_id": "boot-1",
                "seq": 1,
                "type": "heartbeat",
                "payload": {"agent_version": version, "health": "ok"},
            },
        }
    ).encode()


def test_a_dead_letter_reads_its_headers_and_previews_safely() -> None:
    poison = letter(b"not json \xff\x00\x1b[2J" + b"x" * 200)
    assert (poison.reason, poison.source_topic, poison.source_partition, poison.source_offset) == (
        "invalid",
        "events",
        2,
        17,
    )
    preview = poison.preview()
    assert preview.startswith("not json \\xff\\x00\\x1b[2J")
    assert preview.endswith("…")
    assert "\x00" not in preview
    assert "\x1b" not in preview
    assert letter(None).preview() == "(no value)"
    assert letter(None).to_json()["value_bytes"] is None


def test_verdict_is_the_controllers_decode() -> None:
    assert verdict(letter(None), agent_event("1.0")).startswith("invalid:")
    assert verdict(letter(None), agent_event("1.0.0")) == "valid"
    # The key decides the owner: a value for another customer stays poison.
    assert "key" in verdict(letter(None, key=b"other"), agent_event("1.0.0"))
    assert verdict(letter(None), b"{").startswith("undecodable")


async def test_replay_only_valid_skips_without_producing() -> None:
    # An unreachable bootstrap: if replay tried to produce, it would fail.
    outcomes = await replay(
        "127.0.0.1:1",
        [letter(agent_event("1.0"), offset=4), letter(b"nope", offset=5)],
        fallback_topic="events",
        only_valid=True,
    )
    assert [(o.action, o.letter.offset) for o in outcomes] == [("skipped", 4), ("skipped", 5)]
    dry = await replay(
        "127.0.0.1:1",
        [letter(agent_event("1.0"))],
        fallback_topic="events",
        replacement=agent_event("1.0.0"),
        dry_run=True,
    )
    assert [(o.action, o.why) for o in dry] == [("would replay", "valid")]
    with pytest.raises(ValueError, match="exactly one"):
        await replay(
            "127.0.0.1:1",
            [letter(b"a", offset=1), letter(b"b", offset=2)],
            fallback_topic="events",
            replacement=b"{}",
        )


def test_letter_ids() -> None:
    assert parse_letter_id("12") == (0, 12)
    assert parse_letter_id("3:12") == (3, 12)
    with pytest.raises(ValueError, match="PARTITION:OFFSET"):
        parse_letter_id("x")


def pending_age_samples(metrics: ControllerMetrics) -> dict[str, float]:
    return {
        s.labels["partition"]: s.value
        for family in metrics.registry.collect()
        if family.name == "fleetplane_controller_oldest_pending_age_seconds"
        for s in family.samples
    }


def test_a_partition_that_stops_advancing_ages_and_one_that_moves_does_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stalls = StallTracker(warn_after_s=30, owner="controller-1")
    # Nothing waits: age 0.
    assert stalls.observe("events", 0, 100, 100, now_s=1000) == 0.0
    # Records wait and the stored offset stays: the age grows from first sight...
    assert stalls.observe("events", 0, 100, 120, now_s=1000) == 0.0
    assert stalls.observe("events", 0, 100, 125, now_s=1010) == 10.0
    # ...or from the record's own timestamp once it is fetched (older than first sight).
    assert stalls.observe("events", 0, 100, 125, now_s=1011, fetched=(100, 995.0)) == 16.0
    # A timestamp of another record (an earlier batch) says nothing about this one.
    assert stalls.observe("events", 0, 100, 125, now_s=1012, fetched=(90, 900.0)) == 17.0
    with caplog.at_level("WARNING"):
        assert stalls.observe("events", 0, 100, 125, now_s=1030) == 35.0
        assert stalls.observe("events", 0, 100, 125, now_s=1040) == 45.0
    warnings = [r.getMessage() for r in caplog.records if "has not advanced" in r.getMessage()]
    assert warnings == [
        "events[0] has not advanced for 35 s: owner controller-1, stored offset 100, log end 125"
    ]
    # It applies again: the next pending record is judged afresh, and a caught-up
    # partition is at 0.
    assert stalls.observe("events", 0, 110, 125, now_s=1041) == 0.0
    assert stalls.observe("events", 0, 125, 125, now_s=1042) == 0.0


def test_stall_gauge_follows_the_held_partitions() -> None:
    metrics = ControllerMetrics()
    stalls = StallTracker(warn_after_s=60, owner="c")
    ends = {0: 120, 1: 50}
    held = {0: claim(0, 100), 1: claim(1, 50)}
    exported = update_lag(metrics, held, ends.get, set(), stalls=stalls, now_s=10)
    exported = update_lag(
        metrics, held, ends.get, exported, stalls=stalls, fetched={0: (100, 4.0)}, now_s=12
    )
    assert pending_age_samples(metrics) == {"0": 8.0, "1": 0.0}
    update_lag(metrics, {1: claim(1, 50)}, ends.get, exported, stalls=stalls, now_s=13)
    assert pending_age_samples(metrics) == {"1": 0.0}

"""Section ``failover``: how long a partition stops applying when its owner changes.

Steady load is produced straight to the events topic (records in the topic
contract, a fixed rate spread over customers on every partition) while 2 to 3
controller processes of one isolated deployment change membership. Each run:

1. scale out 2 → 3: ``scaleout`` is, per partition that moved to another owner,
   the gap between the last event its old owner applied and the first its new
   owner applied (the join's stop-the-world rebalance), the largest of the moved;
2. ``kill -9`` the owner of the most partitions (3 → 2): ``kill9`` is the time
   from the kill until every partition it owned applied an event again;
3. a new controller joins (2 → 3, not measured);
4. SIGTERM the owner of the most partitions (3 → 2): ``graceful``, as for kill -9.

"Applied again" is read from PostgreSQL: the first ``event_records.applied_at``
of the partition written under a newer epoch than the old owner's (epochs only
grow, so it is the new owner's). ``applied_at`` is the database's clock at the
start of the apply transaction; the signal time is this host's clock, the same
clock the local PostgreSQL reads (their offset is measured and recorded). After
the runs the invariant checker compares every produced event with PostgreSQL.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer

from services.controller.ops import partition_of
from services.controller.settings import ControllerSettings
from tests.support.deployment import Deployment
from tests.support.invariants import Ledger, check
from tests.support.processes import ServiceProcess
from tests.support.records import encode, heartbeat_record
from tests.support.stack import FleetEnv, Stack, prepare_template

RUNS = 5
PARTITIONS = 12
CUSTOMERS_PER_PARTITION = 3
EVENTS_PER_S = 300
SETTLE_TIMEOUT_S = 120.0
APPLY_TIMEOUT_S = 60.0


def _customers() -> list[str]:
    """Customer ids covering every partition ``CUSTOMERS_PER_PARTITION`` times."""
    wanted = dict.fromkeys(range(PARTITIONS), CUSTOMERS_PER_PARTITION)
    found = []
    for i in itertools.count():
        customer = f"cust-{i}"
        partition = partition_of(customer, PARTITIONS)
        if wanted[partition]:
            wanted[partition] -= 1
            found.append(customer)
        if not any(wanted.values()):
            return found
    raise AssertionError("unreachable")


class SteadyProducer:
    """Produces ``EVENTS_PER_S`` heartbeats round-robin over the customers, in a thread.

    Each customer's agent counts its own sequence, and every acknowledged event
    goes into ``ledger`` for the invariant checker.
    """

    def __init__(self, bootstrap: str, topic: str, customers: list[str]) -> None:
        self.ledger = Ledger()
        self._bootstrap = bootstrap
        self._topic = topic
        self._customers = customers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.error: BaseException | None = None

    def start(self) -> SteadyProducer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        if self.error is not None:
            raise RuntimeError("the load producer failed") from self.error

    async def _run(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap, acks="all", enable_idempotence=True, linger_ms=5
        )
        await producer.start()
        try:
            seqs = dict.fromkeys(self._customers, 0)
            turn = itertools.cycle(self._customers)
            tick = 0.02
            started = time.monotonic()
            sent = 0
            while not self._stop.is_set():
                due = int((time.monotonic() - started) * EVENTS_PER_S)
                batch = []
                for _ in range(due - sent):
                    customer = next(turn)
                    seqs[customer] += 1
                    event = heartbeat_record(
                        customer, f"{customer}-{seqs[customer]}", seqs[customer]
                    )
                    future = await producer.send(self._topic, encode(event), key=customer.encode())
                    batch.append((future, customer, event["event"]))
                sent = due
                for future, customer, body in batch:
                    await future
                    self.ledger.record(customer, "prod", "agent-1", [body])
                await asyncio.sleep(tick)
        except BaseException as e:
            self.error = e
            raise
        finally:
            await producer.stop()


Ownership = dict[int, tuple[str, int]]
"""partition -> (owner, epoch), as the ownership table says."""


class Failover:
    """The deployment under test, its controllers and the measurements."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.dsn = deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)
        self.live: dict[str, ServiceProcess] = {}
        self._names = (f"c{i}" for i in itertools.count(1))

    def instance(self, name: str) -> str:
        return f"{self.deployment.fleet.name}-{name}"

    def start(self) -> str:
        name = next(self._names)
        self.live[name] = self.deployment.start_controller(name)
        return name

    def ownership(self) -> Ownership:
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute("SELECT partition, owner, epoch FROM partition_ownership")
            return {p: (o, e) for p, o, e in rows}

    def settle(self) -> Ownership:
        """Wait until exactly the live controllers own every partition, all applying.

        Settled means: the owners are the live controllers, no epoch changed over
        two seconds, and every partition stored an offset in the last second.
        """
        members = {self.instance(n) for n in self.live}
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        last: Ownership | None = None
        while True:
            with psycopg.connect(self.dsn) as conn:
                rows = conn.execute(
                    "SELECT partition, owner, epoch, "
                    "extract(epoch FROM now() - updated_at) FROM partition_ownership "
                    "ORDER BY partition"
                ).fetchall()
            table = {p: (o, e) for p, o, e, _age in rows}
            fresh = all(age < 1.0 for *_x, age in rows)
            if len(table) == PARTITIONS and {o for o, _e in table.values()} == members and fresh:
                if table == last:
                    return table
                last = table
            else:
                last = None
            if time.monotonic() > deadline:
                state = ", ".join(f"{p}: {o} epoch {e}, wrote {a:.0f} s ago" for p, o, e, a in rows)
                raise TimeoutError(f"the group did not settle on {sorted(members)}: {state}")
            time.sleep(2.0)

    def busiest(self) -> str:
        """The live controller that owns the most partitions."""
        counts = {n: 0 for n in self.live}
        by_instance = {self.instance(n): n for n in self.live}
        for owner, _epoch in self.ownership().values():
            counts[by_instance[owner]] += 1
        return max(counts, key=lambda n: counts[n])

    def first_applied_after(self, moved: Ownership) -> dict[int, float]:
        """Per moved partition, the wall-clock time of its first apply under a newer epoch."""
        deadline = time.monotonic() + APPLY_TIMEOUT_S
        while True:
            with psycopg.connect(self.dsn) as conn:
                found = {
                    p: float(t)
                    for p, (_owner, epoch) in moved.items()
                    for (t,) in conn.execute(
                        "SELECT extract(epoch FROM min(applied_at)) FROM event_records "
                        "WHERE partition = %s AND epoch > %s",
                        (p, epoch),
                    )
                    if t is not None
                }
            if len(found) == len(moved):
                return found
            if time.monotonic() > deadline:
                missing = sorted(set(moved) - set(found))
                raise TimeoutError(f"partitions {missing} did not apply again")
            time.sleep(0.2)

    def last_applied_before(self, moved: Ownership) -> dict[int, float]:
        with psycopg.connect(self.dsn) as conn:
            return {
                p: float(t)
                for p, (_owner, epoch) in moved.items()
                for (t,) in conn.execute(
                    "SELECT extract(epoch FROM max(applied_at)) FROM event_records "
                    "WHERE partition = %s AND epoch <= %s",
                    (p, epoch),
                )
                if t is not None
            }

    def clock_offset_s(self) -> float:
        """PostgreSQL's clock minus this process's, from the middle of a round trip."""
        with psycopg.connect(self.dsn) as conn:
            before = time.time()
            row = conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
            after = time.time()
        assert row is not None
        return float(row[0]) - (before + after) / 2

    def stop_owner(self, how: signal.Signals) -> tuple[float, float]:
        """Signal the busiest controller; returns (all moved partitions back, first back)."""
        name = self.busiest()
        process = self.live.pop(name)
        moved = {p: oe for p, oe in self.ownership().items() if oe[0] == self.instance(name)}
        signalled = time.time()
        if how == signal.SIGKILL:
            process.kill()
        else:
            assert process.process is not None
            process.process.send_signal(how)
        back = self.first_applied_after(moved)
        if how != signal.SIGKILL:
            process.stop()  # already leaving; reaps the process
        return max(back.values()) - signalled, min(back.values()) - signalled

    def scale_out(self) -> float:
        """Start one more controller; the longest apply gap among the partitions it moved."""
        before = self.ownership()
        self.start()
        after = self.settle()
        moved = {p: before[p] for p in before if after[p][0] != before[p][0]}
        if not moved:
            raise RuntimeError("a controller joined but no partition moved")
        last = self.last_applied_before(moved)
        first = self.first_applied_after(moved)
        return max(first[p] - last[p] for p in moved)


def _measure(
    label: str, results: dict[str, list[float]], measure: Callable[[], float | tuple[float, ...]]
) -> None:
    value = measure()
    values = value if isinstance(value, tuple) else (value,)
    results.setdefault(label, []).append(values[0])
    if len(values) > 1:
        results.setdefault(f"{label}_first", []).append(values[1])
    print(f"    {label}: {values[0]:.2f} s", flush=True)


def run(stack: Stack) -> tuple[dict[str, Any], dict[str, Any]]:
    prepare_template(stack)
    log_dir = stack.run_dir / "bench-logs" / "failover"
    deployment = Deployment(FleetEnv.new(stack, partitions=PARTITIONS), log_dir).create()
    failover = Failover(deployment)
    load = SteadyProducer(stack.kafka_bootstrap, deployment.fleet.events_topic, _customers())
    results: dict[str, list[float]] = {}
    try:
        load.start()
        try:
            failover.start()
            failover.start()
            failover.settle()
            offset = failover.clock_offset_s()
            for i in range(RUNS):
                print(f"  failover run {i + 1}/{RUNS}", flush=True)
                _measure("scaleout", results, failover.scale_out)
                _measure("kill9", results, lambda: failover.stop_owner(signal.SIGKILL))
                failover.settle()
                failover.start()
                failover.settle()
                _measure("graceful", results, lambda: failover.stop_owner(signal.SIGTERM))
                failover.settle()
        finally:
            load.stop()
        report = _wait_checked(deployment, load.ledger)
    finally:
        deployment.close()
    controller = ControllerSettings()
    figures = {
        "kill9_median_s": round(statistics.median(results["kill9"]), 2),
        "kill9_max_s": round(max(results["kill9"]), 2),
        "graceful_median_s": round(statistics.median(results["graceful"]), 2),
        "scaleout_median_s": round(statistics.median(results["scaleout"]), 2),
        **{f"{k}_runs_s": [round(v, 2) for v in vs] for k, vs in sorted(results.items())},
        "events_checked": report.accepted,
        "invariant_violations": len(report.lost)
        + len(report.duplicated)
        + len(report.out_of_order),
    }
    parameters = {
        "runs": RUNS,
        "topic_partitions": PARTITIONS,
        "controllers": "2-3",
        "customers": PARTITIONS * CUSTOMERS_PER_PARTITION,
        "load_events_per_s": EVENTS_PER_S,
        "session_timeout_s": controller.session_timeout_s,
        "heartbeat_interval_s": controller.heartbeat_interval_s,
        "batch_within_s": controller.batch_within_s,
        "db_minus_host_clock_ms": round(offset * 1000, 3),
        "measured": "kill9/graceful: signal to every moved partition applying again "
        "(*_first: to the first one); scaleout: longest apply gap of a moved partition",
        "nproc": os.cpu_count() or 0,
    }
    return figures, parameters


def _wait_checked(deployment: Deployment, ledger: Ledger) -> Any:
    """Wait until every produced event is recorded, then run the invariant checker."""
    dsn = deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)
    deadline = time.monotonic() + APPLY_TIMEOUT_S
    while True:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT count(*) FROM event_records").fetchone()
        if row is not None and row[0] >= len(ledger):
            break
        if time.monotonic() > deadline:
            break  # the checker reports what is missing
        time.sleep(0.5)
    report = check(ledger, dsn)
    if not report.ok:
        print(
            f"  invariant checker: {len(report.lost)} lost, {len(report.duplicated)} duplicated, "
            f"{len(report.out_of_order)} out of order",
            flush=True,
        )
    return report

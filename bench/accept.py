"""Section ``accept``: what the whole accept path carries, edge → API → Kafka, for a fleet.

One deployment (two API processes, a 12-partition events topic) behind the
stack's edge, and beside it an extra edge from the same template proxying to a
no-op upstream (tests.support.edge_probe.EdgeProbe). The load generator is bench/loadgen, a
Go program built here with the standard library only: AGENTS agents, each with
its own certificate from the real issuing CA and its own kept-alive mutual TLS
connection; each worker owns a share of the agents, so every agent's sequence
numbers rise in the order its requests arrive, and event ids are unique across
the whole run. The agents' customers are chosen so that every partition gets
records. Per-agent rate and connection limits are lifted (``make bench`` exports
them; the values used are in the parameters).

Measured in one run, alternating the order, RUNS times each, DURATION_S seconds:

- ``edge_only_rps``: single-event POSTs to the no-op upstream (the edge's own ceiling);
- ``single.rps``: single-event POSTs through the edge and the API into Kafka;
  ``single.vs_edge_only`` is their quotient (target at least 0.5);
- ``batch20.events_per_s``: 20-event POSTs into Kafka (target at least 20,000);
- p50 and p99 of each, and per-process CPU seconds per second of the run
  (edge workers, each API, Kafka, the load generator), so a client-bound run
  shows itself;
- ``accepted``: every event answered 202, and ``kafka_records``: what the topic
  holds afterwards (end minus beginning offsets); they must be equal.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

from bench.edge import batch20_body, cpu_seconds, single_body
from services.gateway_auth.pki import load_issuing_ca, write_agent_certificate
from tests.support.deployment import Deployment
from tests.support.edge_probe import EdgeProbe, lib_settings
from tests.support.gotools import GOBIN, go_binary
from tests.support.stack import FleetEnv, Stack, prepare_template

AGENTS: Final = 200
PARTITIONS: Final = 12
WORKERS: Final = 64
DURATION_S: Final = 10
RUNS: Final = 3
LOADGEN_DIR: Final = Path(__file__).resolve().parent / "loadgen"


def loadgen() -> Path:
    """The load generator, built once per version of its source."""
    source = b"".join(p.read_bytes() for p in sorted(LOADGEN_DIR.glob("*.go")))
    binary = GOBIN / f"fleetplane-loadgen-{hashlib.sha256(source).hexdigest()[:12]}"
    if not binary.exists():
        print("  building bench/loadgen (once)", flush=True)
        GOBIN.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [go_binary(), "build", "-o", str(binary), "."],
            cwd=LOADGEN_DIR,
            env={**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"},
            check=True,
        )
    return binary


def event_templates(body: bytes) -> list[str]:
    """Each event of a batch as JSON with ``@ID@`` and ``@SEQ@`` for the load generator."""
    templates = []
    for event in json.loads(body)["events"]:
        event["id"], event["seq"] = "@ID@", "@SEQ@"
        templates.append(json.dumps(event, separators=(",", ":")).replace('"@SEQ@"', "@SEQ@"))
    return templates


def fleet_customers(count: int, partitions: int) -> list[str]:
    """``count`` customer ids whose records land on every partition in turn (key = customer id)."""
    partitioner = DefaultPartitioner()
    every = list(range(partitions))
    by_partition: dict[int, list[str]] = {p: [] for p in every}
    candidate = 0
    while min(len(found) for found in by_partition.values()) * partitions < count:
        customer = f"bench-{candidate}"
        by_partition[partitioner(customer.encode(), every, every)].append(customer)
        candidate += 1
    return [by_partition[i % partitions][i // partitions] for i in range(count)]


@retry(
    retry=retry_if_exception_type(RuntimeError),
    stop=stop_after_delay(120),
    wait=wait_fixed(5),
    reraise=True,
)
def start_probe(stack: Stack) -> EdgeProbe:
    """The no-op edge, started; retried while its ports are taken.

    The stack's ports lie in the kernel's ephemeral range, so another process's
    outgoing connection (or its TIME-WAIT) can hold one for up to a minute.
    """
    return EdgeProbe(stack.run_dir / "bench-accept-edge", stack.pki_dir).start()


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def pid_file(stack: Stack, name: str) -> int:
    return int((stack.run_dir / "pids" / f"{name}.pid").read_text().split()[0])


@contextmanager
def cpu_meter(processes: dict[str, list[int]]) -> Iterator[dict[str, float]]:
    """CPU seconds per wall second of each named group of processes over the block."""
    used: dict[str, float] = {}
    before = {name: cpu_seconds(pids) for name, pids in processes.items()}
    started = time.monotonic()
    yield used
    elapsed = time.monotonic() - started
    for name, pids in processes.items():
        used[name] = round((cpu_seconds(pids) - before[name]) / elapsed, 3)


def drive(
    binary: Path, work: Path, url: str, agents: list[tuple[Path, Path]], events: list[str]
) -> dict[str, Any]:
    """One load generator run; its result (see bench/loadgen/main.go)."""
    config = work / "loadgen.json"
    config.write_text(
        json.dumps(
            {
                "url": url,
                "root_ca": str(Stack().pki_dir / "root-ca.pem"),
                "agents": [{"cert": str(c), "key": str(k)} for c, k in agents],
                "events": events,
                "run_id": uuid.uuid4().hex[:12],
                "duration_s": DURATION_S,
                "workers": WORKERS,
            }
        )
    )
    done = subprocess.run([str(binary), str(config)], capture_output=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def topic_records(bootstrap: str, topic: str, count: int) -> dict[int, int]:
    """Records on each of the ``count`` partitions of ``topic``: end minus beginning offset."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(count)]
        ends = await consumer.end_offsets(partitions)
        starts = await consumer.beginning_offsets(partitions)
    finally:
        await consumer.stop()
    return {tp.partition: ends[tp] - starts[tp] for tp in partitions}


def _summary(runs: list[dict[str, Any]], rate: str) -> dict[str, Any]:
    return {
        rate: round(statistics.median(r[rate] for r in runs), 1),
        f"{rate}_runs": [round(r[rate], 1) for r in runs],
        "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 2),
        "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 2),
        "not_accepted": sum(r["requests"] - r["accepted_requests"] for r in runs),
        "cpu": {
            name: round(statistics.median(r["cpu"][name] for r in runs), 2)
            for name in runs[0]["cpu"]
        },
    }


def run(stack: Stack) -> tuple[dict[str, Any], dict[str, Any]]:
    prepare_template(stack)
    binary = loadgen()
    settings = lib_settings()
    deployment = Deployment(
        FleetEnv.new(stack, partitions=PARTITIONS), stack.run_dir / "bench-logs"
    ).create()
    runs: dict[str, list[dict[str, Any]]] = {"edge_only": [], "single": [], "batch20": []}
    try:
        deployment.start_apis()
        edge_workers = children(pid_file(stack, "nginx"))
        kafka = [pid_file(stack, "kafka")]
        apis = {f"api_{port}": [process.pid] for port, process in deployment.apis.items()}
        with tempfile.TemporaryDirectory() as tmp, ExitStack() as cleanup:
            probe = start_probe(stack)
            cleanup.callback(probe.stop)
            work = Path(tmp)
            ca = load_issuing_ca(stack.pki_dir)
            agents = [
                write_agent_certificate(ca, work / "certs", customer, "prod", f"agent-{i}")
                for i, customer in enumerate(fleet_customers(AGENTS, PARTITIONS))
            ]
            shapes: dict[str, tuple[str, list[str], dict[str, list[int]]]] = {
                "edge_only": (
                    f"{probe.agent_url}/v1/events",
                    event_templates(single_body()),
                    {"edge": probe.edge.worker_pids()},
                ),
                "single": (
                    f"{stack.edge_url}/v1/events",
                    event_templates(single_body()),
                    {"edge": edge_workers, **apis, "kafka": kafka},
                ),
                "batch20": (
                    f"{stack.edge_url}/v1/events",
                    event_templates(batch20_body()),
                    {"edge": edge_workers, **apis, "kafka": kafka},
                ),
            }
            order = list(shapes)
            for i in range(RUNS):
                for name in order if i % 2 == 0 else reversed(order):
                    print(f"  accept run {i + 1}/{RUNS}: {name}", flush=True)
                    url, events, processes = shapes[name]
                    with cpu_meter(processes) as cpu:
                        result = drive(binary, work, url, agents, events)
                    # The load generator measures its own CPU over the timed part.
                    cpu["loadgen"] = round(result["cpu_s"] / result["elapsed_s"], 3)
                    result["cpu"] = cpu
                    refused = {k: v for k, v in result["status_codes"].items() if k != "202"}
                    if refused or result["errors"]:
                        # Kept in the figures: a refusal is part of what was measured.
                        print(f"    not accepted: {refused} {result['errors']}", flush=True)
                    runs[name].append(result)
        accepted = sum(
            r["accepted_events"] + r["warmup_events"] for r in runs["single"] + runs["batch20"]
        )
        held = asyncio.run(
            topic_records(stack.kafka_bootstrap, deployment.fleet.events_topic, PARTITIONS)
        )
    finally:
        deployment.close()
    edge_only = _summary(runs["edge_only"], "rps")
    single = _summary(runs["single"], "rps")
    single["vs_edge_only"] = round(single["rps"] / edge_only["rps"], 3)
    # Each run's pair of single and edge-only measurements, taken one after the other.
    single["vs_edge_only_runs"] = [
        round(s["rps"] / e["rps"], 3)
        for s, e in zip(runs["single"], runs["edge_only"], strict=True)
    ]
    figures: dict[str, Any] = {
        "edge_only_rps": edge_only["rps"],
        "edge_only": edge_only,
        "single": single,
        "batch20": _summary(runs["batch20"], "events_per_s"),
        "accepted": accepted,
        "kafka_records": sum(held.values()),
        "accepted_equals_kafka_records": accepted == sum(held.values()),
        "kafka_records_per_partition": [held[p] for p in sorted(held)],
    }
    parameters = {
        "runs": RUNS,
        "duration_s": DURATION_S,
        "agents": AGENTS,
        "workers": WORKERS,
        "topic_partitions": PARTITIONS,
        "api_processes": len(stack.api_ports),
        "load_generator": "bench/loadgen (Go, net/http, one kept-alive mTLS connection per agent)",
        "edge_limits": {
            key: settings[key]
            for key in (
                "AGENT_RATE",
                "AGENT_BURST",
                "AGENT_CONN",
                "EDGE_CONN",
                "API_CONNS",
            )
        },
        "nginx_workers": int(settings["NGINX_WORKERS"]),
        "upstream_of_edge_only": "no-op nginx, 202 over mutual TLS",
    }
    return figures, parameters

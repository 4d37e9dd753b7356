"""Section ``edge``: what the WAF costs on the agent routes.

Two edges rendered from infra/nginx/edge.conf.template (tests.support.edge_probe.EdgeProbe),
identical but for ``modsecurity on|off`` in the agent listener, are measured
side by side in one run, alternately, each proxying to a no-op upstream (nginx
answering 202 over the same mutual TLS as the API), so the figures are the
edge's own and not the API's or Kafka's. vegeta drives ``POST /v1/events`` over
mutual TLS with keep-alive from one agent certificate; the limits are lifted in
both edges (they are not what is measured here).

- ``single``: one heartbeat per request (about 150 bytes);
- ``batch20``: 20 events per request (about 3.2 KB), as agents batch them.

For each: ``waf_off_rps`` and ``waf_on_rps`` (median of the runs; successful
requests per second), ``waf_on_ratio`` (their quotient; the target is at least
0.5; ``waf_on_ratio_runs`` has each run's pair), and the nginx worker's CPU time
per request (``*_cpu_us``), which shows the WAF's own cost when the shared
machine's load moves the throughput: the edge's capacity on a core of its own
is in proportion to its inverse.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.simulator.events import EventFactory, Resource
from bench.vegeta import vegeta
from services.gateway_auth.pki import load_issuing_ca, write_agent_certificate
from tests.support.edge_probe import EdgeProbe, lib_settings
from tests.support.stack import Stack

DURATION_S = 10
WORKERS = 16
RUNS = 5


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time the processes used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def single_body() -> bytes:
    return json.dumps({"events": [EventFactory().heartbeat()]}).encode()


def batch20_body() -> bytes:
    events = EventFactory()
    batch = [events.heartbeat() for _ in range(16)]
    batch.append(events.heartbeat("degraded", "disk /var/lib/app at 91 %; rotated logs"))
    batch.append(
        events.observed_state(
            [
                Resource("deployment", "web", "2.4.1"),
                Resource("statefulset", "db", "15.4"),
                Resource("cronjob", "backup", "1.0.0"),
            ]
        )
    )
    batch.append(events.command_result(41, 7, "succeeded", "applied web 2.4.1 in 3.2 s"))
    batch.append(events.command_result(42, 7, "failed", "image pull: 429 Too Many Requests"))
    return json.dumps({"events": batch}).encode()


def measure(probe: EdgeProbe, body: Path, cert: Path, key: Path, root_ca: Path) -> dict[str, Any]:
    workers = probe.edge.worker_pids()
    before = cpu_seconds(workers)
    result = vegeta.attack(
        url=f"{probe.agent_url}/v1/events",
        body=body,
        cert=cert,
        key=key,
        root_ca=root_ca,
        duration_s=DURATION_S,
        workers=WORKERS,
    )
    requests = sum(int(n) for n in result["status_codes"].values())
    result["cpu_us"] = (cpu_seconds(workers) - before) / max(requests, 1) * 1e6
    return result


def run(stack: Stack) -> tuple[dict[str, Any], dict[str, Any]]:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        shape: {"off": [], "on": []} for shape in ("single", "batch20")
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cert, key = write_agent_certificate(
            load_issuing_ca(stack.pki_dir), work, "bench", "prod", "agent-1"
        )
        bodies = {"single": work / "single.json", "batch20": work / "batch20.json"}
        bodies["single"].write_bytes(single_body())
        bodies["batch20"].write_bytes(batch20_body())
        for i in range(RUNS):
            # Alternate which edge goes first, so a drift in the machine's load
            # does not always favour the same one.
            order = ("off", "on") if i % 2 == 0 else ("on", "off")
            for shape, body in bodies.items():
                for waf in order:
                    print(f"  edge run {i + 1}/{RUNS}: {shape}, WAF {waf}", flush=True)
                    probe = EdgeProbe(
                        stack.run_dir / "bench-edge", stack.pki_dir, agent_waf=waf == "on"
                    )
                    with probe:
                        result = measure(probe, body, cert, key, stack.pki_dir / "root-ca.pem")
                    if result["success"] < 0.99:
                        raise RuntimeError(f"edge {shape} WAF {waf}: {result['status_codes']}")
                    runs[shape][waf].append(result)
        sizes = {shape: body.stat().st_size for shape, body in bodies.items()}
    figures: dict[str, Any] = {}
    for shape, by_waf in runs.items():
        off = statistics.median(r["rps"] for r in by_waf["off"])
        on = statistics.median(r["rps"] for r in by_waf["on"])
        figures[shape] = {
            "waf_off_rps": round(off, 1),
            "waf_on_rps": round(on, 1),
            "waf_on_ratio": round(on / off, 3),
            "waf_off_rps_runs": [round(r["rps"], 1) for r in by_waf["off"]],
            "waf_on_rps_runs": [round(r["rps"], 1) for r in by_waf["on"]],
            # Each run's two edges were measured one after the other.
            "waf_on_ratio_runs": [
                round(on_run["rps"] / off_run["rps"], 3)
                for on_run, off_run in zip(by_waf["on"], by_waf["off"], strict=True)
            ],
            "waf_off_cpu_us": round(statistics.median(r["cpu_us"] for r in by_waf["off"]), 1),
            "waf_on_cpu_us": round(statistics.median(r["cpu_us"] for r in by_waf["on"]), 1),
            "waf_off_p99_ms": round(statistics.median(r["p99_ms"] for r in by_waf["off"]), 2),
            "waf_on_p99_ms": round(statistics.median(r["p99_ms"] for r in by_waf["on"]), 2),
        }
    parameters = {
        "runs": RUNS,
        "duration_s": DURATION_S,
        "workers": WORKERS,
        "body_bytes": sizes,
        "upstream": "no-op nginx, 202 over mutual TLS (infra/nginx/noop-upstream.conf.template)",
        "agent_policy": "infra/nginx/modsecurity/agent.conf",
        "nginx_workers": int(lib_settings()["NGINX_WORKERS"]),
    }
    return figures, parameters

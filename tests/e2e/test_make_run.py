"""`make run` then `make stop`: the whole stack comes up, agents' events are applied,
commands flow, and nothing is left running or listening afterwards.

Runs a second, complete stack beside the test stack, on its own ports and run
folder, exactly as a developer would start it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest
from tenacity import RetryCallState, retry, retry_if_result, stop_after_delay, wait_fixed

from services.backup.settings import S3Settings
from services.backup.storage import S3Storage, StorageError
from tests.support.stack import ROOT

PORTS = {
    "FLEETPLANE_KAFKA_PORT": 29092,
    "FLEETPLANE_KAFKA_CONTROLLER_PORT": 29093,
    "FLEETPLANE_DATABASE_PORT": 25432,
    "FLEETPLANE_EDGE_PORT": 28443,
    "FLEETPLANE_OPERATOR_PORT": 28444,
    "FLEETPLANE_ENROLL_PORT": 28445,
    "FLEETPLANE_GATEWAY_AUTH_PORT": 28083,
    "FLEETPLANE_S3_PORT": 28900,
    "FLEETPLANE_BACKUP_METRICS_PORT": 28990,
    "FLEETPLANE_PROMETHEUS_PORT": 29090,
    "FLEETPLANE_ALERTMANAGER_PORT": 29094,
    "FLEETPLANE_POSTGRES_EXPORTER_PORT": 29187,
    "FLEETPLANE_EDGE_EXPORTER_PORT": 29903,
    "FLEETPLANE_KAFKA_METRICS_PORT": 29095,
    "FLEETPLANE_EDGE_STATUS_PORT": 28446,
    "FLEETPLANE_NGINX_EXPORTER_PORT": 29113,
}
API_PORTS = (28081, 28082)
CONTROLLER_PORTS = (28091, 28092)
ALL_PORTS = (*PORTS.values(), *API_PORTS, *CONTROLLER_PORTS)


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{proc.name}: {cmdline[:160]}")
    return found


@pytest.fixture
def run_env() -> Iterator[dict[str, str]]:
    run_dir = ROOT / ".run" / "make-run-test"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETPLANE_")}
    env.update({name: str(port) for name, port in PORTS.items()})
    env.update(
        {
            "FLEETPLANE_RUN_DIR": str(run_dir),
            "FLEETPLANE_API_PORTS": " ".join(map(str, API_PORTS)),
            "FLEETPLANE_CONTROLLER_PORTS": " ".join(map(str, CONTROLLER_PORTS)),
            "FLEETPLANE_RUN_DURATION": "240",
            "FLEETPLANE_SIM_AGENTS": "12",
            "FLEETPLANE_SIM_CUSTOMERS": "3",
        }
    )
    busy = [p for p in ALL_PORTS if listening(p)]
    assert not busy, f"ports already in use before make run: {busy}"
    yield env
    # Whatever happened, leave nothing behind for the next test.
    subprocess.run(["make", "stop"], cwd=ROOT, env=env, capture_output=True, timeout=120)


def _last_result(state: RetryCallState) -> Any:
    """At the deadline, the last answer: the caller's assertion then shows it."""
    assert state.outcome is not None
    return state.outcome.result()


def _not_all_up(health: dict[str, list[str]]) -> bool:
    return not all(h == "up" for hs in health.values() for h in hs)


@retry(
    retry=retry_if_result(_not_all_up),
    wait=wait_fixed(1),
    stop=stop_after_delay(60),
    retry_error_callback=_last_result,
)
def scrape_health(prometheus: str) -> dict[str, list[str]]:
    """Prometheus's targets, job -> health of each; waits out the first scrape."""
    with urllib.request.urlopen(f"{prometheus}/api/v1/targets", timeout=5) as reply:
        targets = json.load(reply)["data"]["activeTargets"]
    health: dict[str, list[str]] = {}
    for target in targets:
        health.setdefault(target["labels"]["job"], []).append(target["health"])
    return health


@retry(
    retry=retry_if_result(bool),
    wait=wait_fixed(0.2),
    stop=stop_after_delay(30),
    retry_error_callback=_last_result,
)
def still_listening() -> list[int]:
    """The ports still open, once they all closed or at the deadline."""
    return [p for p in ALL_PORTS if listening(p)]


OWNER_LINE: Final = re.compile(r"^\s+(\S+)\s+partitions ([\d,]+)\s+lag \d+", re.MULTILINE)


def shown_ownership(output: str) -> dict[str, list[int]]:
    """The last ownership block make run printed: owner -> partitions."""
    block = output.rpartition("ownership (controllers' /status)")[2].split("\nt=")[0]
    return {
        owner: [int(p) for p in partitions.split(",")]
        for owner, partitions in OWNER_LINE.findall(block)
    }


def test_make_run_then_make_stop(run_env: dict[str, str]) -> None:
    log_path = Path(run_env["FLEETPLANE_RUN_DIR"]).with_suffix(".log")
    with log_path.open("wb") as log:
        run = subprocess.Popen(
            ["make", "run"],
            cwd=ROOT,
            env=run_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    dsn = (
        f"host=127.0.0.1 port={PORTS['FLEETPLANE_DATABASE_PORT']} dbname=fleetplane "
        "user=fleetplane password=fleetplane connect_timeout=2"
    )
    try:
        deadline = time.monotonic() + 240
        applied = succeeded = backups = 0
        bucket = S3Storage(S3Settings(port=PORTS["FLEETPLANE_S3_PORT"], max_attempts=1))
        while time.monotonic() < deadline and run.poll() is None:
            try:
                with psycopg.connect(dsn) as conn:
                    applied = conn.execute("SELECT count(*) FROM event_records").fetchone()[0]  # type: ignore[index]
                    succeeded = conn.execute(
                        "SELECT count(*) FROM commands WHERE status = 'succeeded'"
                    ).fetchone()[0]  # type: ignore[index]
            except psycopg.Error:
                pass  # not up yet
            try:
                objects = bucket.list_objects("backups/fleetplane/")
                backups = sum(o.key.endswith("/manifest.json") for o in objects)
            except StorageError:
                pass  # not up yet
            shown = shown_ownership(log_path.read_text(errors="replace"))
            if applied > 50 and succeeded > 0 and len(shown) == 2 and backups > 0:
                break
            time.sleep(2)
        output = log_path.read_text(errors="replace")
        assert run.poll() is None, f"make run exited early:\n{output[-3000:]}"
        assert applied > 50, f"only {applied} events applied:\n{output[-3000:]}"
        assert succeeded > 0, f"no command succeeded:\n{output[-3000:]}"
        assert backups > 0, f"no scheduled backup landed in the bucket:\n{output[-3000:]}"
        assert "Fleetplane is running" in output
        # The live ownership view: both controllers, every partition owned once.
        shown = shown_ownership(output)
        assert len(shown) == 2, f"ownership shown: {shown}\n{output[-3000:]}"
        assert sorted(p for held in shown.values() for p in held) == list(range(12)), shown
        # Monitoring: shown, and scraping every service of this stack.
        prometheus = f"http://127.0.0.1:{PORTS['FLEETPLANE_PROMETHEUS_PORT']}"
        assert prometheus in output
        assert f":{PORTS['FLEETPLANE_ALERTMANAGER_PORT']}" in output
        assert scrape_health(prometheus) == {
            "fleetplane-api": ["up", "up"],
            "fleetplane-gateway-auth": ["up"],
            "fleetplane-controller": ["up", "up"],
            "postgres": ["up"],
            "edge": ["up"],
            "nginx": ["up"],
            "kafka": ["up"],
            "fleetplane-backup": ["up"],
            "prometheus": ["up"],
            "alertmanager": ["up"],
        }
    finally:
        stop = subprocess.run(
            ["make", "stop"], cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=180
        )
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            raise
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert still_listening() == []
    assert processes_mentioning(run_env["FLEETPLANE_RUN_DIR"]) == []
    assert processes_mentioning("services.api --port 2808") == []
    assert processes_mentioning("services.gateway_auth --port 28083") == []
    assert processes_mentioning("services.controller --web-port 2809") == []
    assert processes_mentioning("bench.simulator") == []
    assert processes_mentioning("services.backup schedule --port 28990") == []

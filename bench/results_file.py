"""Merging section results into ``bench/results/latest.json`` with the run's context."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results") / "latest.json"


def _first_line(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not found"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except OSError:
        mem_kb = 0
    return {
        "cores": os.cpu_count() or 0,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "cpu": cpu,
        "kernel": platform.release(),
    }


def versions() -> dict[str, str]:
    packages = ("aiohttp", "aiokafka", "faust-streaming", "sqlalchemy", "psycopg")
    found = {name: metadata.version(name) for name in packages}
    found.update(
        {
            "python": platform.python_version(),
            "kafka": "3.9.1",
            "nginx": _first_line(["nginx", "-v"]),
            "postgresql": _first_line(["/usr/lib/postgresql/15/bin/postgres", "--version"]),
        }
    )
    return found


def merge(section: str, figures: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """Replace one section in the results file, keeping the others."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[section] = figures
    results.setdefault("parameters", {})[section] = parameters
    results.setdefault("measured_at", {})[section] = datetime.now(UTC).isoformat(timespec="seconds")
    results["machine"] = machine()
    results["versions"] = versions()
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results

"""External load tools, installed on first use into the project's cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("FLEETPLANE_CACHE", Path.home() / ".cache" / "fleetplane"))
GOBIN = CACHE / "go-bin"
VEGETA_MODULE = "github.com/tsenart/vegeta/v12@v12.13.0"


def go_tool(name: str, module: str) -> Path:
    binary = GOBIN / name
    if not binary.exists():
        go = shutil.which("go") or "/usr/local/go/bin/go"
        print(f"  installing {module} (once)", flush=True)
        subprocess.run([go, "install", module], env={**os.environ, "GOBIN": str(GOBIN)}, check=True)
    return binary


class Vegeta:
    def attack(
        self,
        *,
        url: str,
        body: Path,
        cert: Path,
        key: Path,
        root_ca: Path,
        duration_s: int,
        workers: int,
    ) -> dict[str, float]:
        """POST ``body`` to ``url`` as fast as ``workers`` connections allow.

        Returns requests/s of successful answers, success ratio and latency quantiles.
        """
        binary = go_tool("vegeta", VEGETA_MODULE)
        target = f"POST {url}\nContent-Type: application/json\n@{body}\n"
        attack = subprocess.run(
            [
                str(binary),
                "attack",
                "-rate=0",
                f"-max-workers={workers}",
                f"-workers={workers}",
                f"-duration={duration_s}s",
                f"-cert={cert}",
                f"-key={key}",
                f"-root-certs={root_ca}",
                "-keepalive=true",
                "-timeout=10s",
            ],
            input=target.encode(),
            capture_output=True,
            check=True,
        )
        report = subprocess.run(
            [str(binary), "report", "-type=json"],
            input=attack.stdout,
            capture_output=True,
            check=True,
        )
        parsed: dict[str, Any] = json.loads(report.stdout)
        latencies = parsed["latencies"]
        return {
            "rps": float(parsed["throughput"]),
            "success": float(parsed["success"]),
            "p50_ms": latencies["50th"] / 1e6,
            "p99_ms": latencies["99th"] / 1e6,
            "status_codes": parsed["status_codes"],
        }


vegeta = Vegeta()

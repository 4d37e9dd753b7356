"""vegeta, the HTTP load generator, installed on first use into the project's cache."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.support.gotools import go_tool

VEGETA_MODULE = "github.com/tsenart/vegeta/v12@v12.13.0"


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
    ) -> dict[str, Any]:
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

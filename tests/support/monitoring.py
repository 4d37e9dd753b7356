"""The native Prometheus and Alertmanager for one test, and a webhook that records notifications.

``infra/local/observability.sh`` starts them exactly as ``make run`` does, with
test timings: scrapes and rule evaluations every second, and Alertmanager
notifying within a second or two of a change (the rules and their ``for:`` are
the real ones). Ports are the stack's (FLEETPLANE_PROMETHEUS_PORT and friends);
data, configs and logs go to a folder of the test's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.stack import ROOT, Stack

SCRIPT = ROOT / "infra" / "local" / "observability.sh"
# Shorter than any rule's `for:` by far, so an alert's timing is the rule's own.
TEST_TIMINGS = {
    "FLEETPLANE_PROMETHEUS_SCRAPE_INTERVAL": "1s",
    "FLEETPLANE_PROMETHEUS_SCRAPE_TIMEOUT": "1s",
    "FLEETPLANE_PROMETHEUS_EVALUATION_INTERVAL": "1s",
    "FLEETPLANE_ALERTMANAGER_GROUP_WAIT": "1s",
    "FLEETPLANE_ALERTMANAGER_GROUP_INTERVAL": "2s",
    "FLEETPLANE_ALERTMANAGER_REPEAT_INTERVAL": "1h",
}


@dataclass(frozen=True)
class Notification:
    """One webhook call of Alertmanager: the receiver it was routed to, and its alerts."""

    receiver: str
    status: str
    alerts: list[dict[str, Any]]
    received_at: float
    """time.monotonic() when it arrived."""

    def names(self, status: str | None = None) -> set[str]:
        return {a["labels"]["alertname"] for a in self.alerts if status in (None, a["status"])}


@dataclass
class WebhookReceiver:
    """Alertmanager's webhook receiver: records every notification, in order."""

    notifications: list[Notification] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post("/{receiver}", self._receive)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.notifications.append(
            Notification(
                request.match_info["receiver"], body["status"], body["alerts"], time.monotonic()
            )
        )
        return web.Response(status=200)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def received(self, receiver: str, alertname: str, status: str) -> list[Notification]:
        return [
            n for n in self.notifications if n.receiver == receiver and alertname in n.names(status)
        ]


class Monitoring:
    """Prometheus, Alertmanager and the PostgreSQL exporter of one test."""

    def __init__(self, stack: Stack, name: str, controller_ports: Iterable[int], webhook_url: str):
        self.dir = stack.run_dir / "test-observability" / name
        self.env = {
            **os.environ,
            **TEST_TIMINGS,
            "FLEETPLANE_OBSERVABILITY_DIR": str(self.dir),
            "FLEETPLANE_CONTROLLER_PORTS": " ".join(map(str, controller_ports)),
            "FLEETPLANE_ALERTMANAGER_WEBHOOK_URL": webhook_url,
            "FLEETPLANE_DEPLOYMENT_NAME": name,
        }
        port = os.environ.get("FLEETPLANE_PROMETHEUS_PORT", "19090")
        self.prometheus_url = f"http://127.0.0.1:{port}"

    def _script(self, action: str) -> None:
        result = subprocess.run(
            ["bash", str(SCRIPT), action],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"observability.sh {action} failed:\n{result.stdout}{result.stderr}")

    def start(self) -> Monitoring:
        shutil.rmtree(self.dir, ignore_errors=True)
        self._script("start")
        return self

    def stop(self) -> None:
        self._script("stop")

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector (raises on a PromQL error)."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{self.prometheus_url}/api/v1/query",
                params={"query": promql},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as reply,
        ):
            body = await reply.json()
        if body.get("status") != "success":
            raise AssertionError(f"query {promql!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value(self, promql: str) -> float | None:
        """The single value of an instant query, or None when it returns nothing."""
        result = await self.query(promql)
        if not result:
            return None
        assert len(result) == 1, f"{promql!r} returned {len(result)} series: {result}"
        return float(result[0]["value"][1])

    async def alerts(self, alertname: str) -> list[dict[str, Any]]:
        """Prometheus's pending and firing instances of an alert, now."""
        return await self.query(f'ALERTS{{alertname="{alertname}"}}')

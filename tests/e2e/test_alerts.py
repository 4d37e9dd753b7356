"""Alerts end to end on the native Prometheus and Alertmanager, with the real rules.

Real API, gateway_auth and controller processes on the test stack; Prometheus
scrapes them every second and Alertmanager posts to a webhook in the test.
Every controller stopped for longer than the no-owner alert's ``for:`` pages,
and the page resolves once controllers are back; a single ``kill -9`` with fast
failover pages no one. A partition whose owner is up but cannot apply (a row
lock the test holds on its offset) pages as stalled, and resolves when it moves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final
from urllib.parse import urlsplit

import psycopg
import pytest
import yaml

from tests.support import ownership as own
from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.monitoring import Monitoring, Notification, WebhookReceiver
from tests.support.processes import ServiceProcess
from tests.support.stack import ROOT
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(300)

NO_OWNER: Final = "FleetplanePartitionWithoutOwner"
STALLED: Final = "FleetplanePartitionStalled"


def rule_for_seconds(alertname: str) -> float:
    rules = yaml.safe_load((ROOT / "infra/observability/rules/fleetplane.rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alertname:
                text = str(rule["for"])
                units = {"s": 1, "m": 60, "h": 3600}
                return float(text[:-1]) * units[text[-1]]
    raise AssertionError(f"no alert {alertname}")


def port_of(process: ServiceProcess) -> int:
    port = urlsplit(process.health_url).port
    assert port is not None
    return port


async def test_no_owner_pages_and_resolves_and_a_kill9_pages_no_one(
    deployment: Deployment, monitoring: Monitoring, receiver: WebhookReceiver
) -> None:
    for_s = rule_for_seconds(NO_OWNER)
    partitions = deployment.fleet.partitions
    deployment.start_apis()
    victim = deployment.start_controller("c1")
    survivor = deployment.start_controller("c2")

    async def exported(instance: str = "") -> float | None:
        selector = f'{{instance="{instance}"}}' if instance else ""
        return await monitoring.value(f"count(fleetplane_controller_partition_lag{selector})")

    async def pages_firing() -> list[Notification]:
        return receiver.received("page", NO_OWNER, "firing")

    async def resolved() -> list[Notification]:
        return [n for n in receiver.notifications if n.status == "resolved"]

    # Prometheus sees every service up and every partition owned.
    await eventually(
        lambda: monitoring.value('count(up{job=~"fleetplane-.*"} == 1)'),
        lambda v: v == 1 + len(deployment.apis) + 2,
        timeout_s=60,
        what="every service scraped",
    )
    await eventually(
        exported, lambda v: v == partitions, timeout_s=60, what="every partition owned"
    )

    # A single kill -9: the survivor takes every partition within seconds, the
    # no-owner alert at most goes pending and clears, long before its `for:`.
    killed_at = own.kill9(victim)
    await eventually(
        lambda: exported(f"127.0.0.1:{port_of(survivor)}"),
        lambda v: v == partitions,
        timeout_s=30,
        what="the survivor owns every partition",
    )
    failover_s = time.monotonic() - killed_at
    await eventually(lambda: monitoring.alerts(NO_OWNER), lambda a: a == [], timeout_s=10)
    print(f"kill -9 to every partition exported by the survivor: {failover_s:.1f} s")
    assert failover_s < for_s / 2

    # Every controller stopped: the lag series vanish, `up` tells; one page.
    survivor.stop()
    stopped_at = time.monotonic()
    await eventually(
        pages_firing,
        bool,
        timeout_s=for_s + 30,
        interval_s=0.5,
        what="the no-owner page",
    )
    fired_s = receiver.received("page", NO_OWNER, "firing")[0].received_at - stopped_at
    print(f"every controller stopped to the no-owner page: {fired_s:.1f} s (for: {for_s:.0f} s)")
    assert fired_s >= for_s

    # Controllers back: the page resolves.
    deployment.start_controller("c3")
    deployment.start_controller("c4")
    back_at = time.monotonic()
    await eventually(
        resolved,
        bool,
        timeout_s=30,
        interval_s=0.5,
        what="the no-owner page resolved",
    )
    print(f"controllers started to the page resolved: {time.monotonic() - back_at:.1f} s")

    # Nothing else reached anyone: the kill -9 paged no one, no other alert fired.
    assert {n.receiver for n in receiver.notifications} == {"page"}
    assert set().union(*(n.names() for n in receiver.notifications)) == {NO_OWNER}
    assert min(n.received_at for n in receiver.notifications) >= stopped_at + for_s


async def test_a_stalled_partition_pages_and_resolves_when_it_moves_again(
    deployment: Deployment,
    monitoring: Monitoring,
    receiver: WebhookReceiver,
    agents: Callable[[str, str, str], AgentClient],
) -> None:
    deployment.start_apis()
    deployment.start_controller("c1")
    partitions = deployment.fleet.partitions
    await eventually(
        lambda: monitoring.value("count(fleetplane_controller_partition_lag)"),
        lambda v: v == partitions,
        timeout_s=60,
        what="every partition owned",
    )
    customer = "cust-stall"
    stalled = own.partition_for(customer, partitions)
    agent = agents(customer, "env-1", "agent-1")

    # The owner stays up and keeps its partitions, but cannot store the offset of
    # the stalled partition: the test holds that row's lock.
    dsn = deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)
    with psycopg.connect(dsn) as lock:
        lock.execute(
            "SELECT 1 FROM partition_ownership WHERE topic = %s AND partition = %s FOR UPDATE",
            (deployment.fleet.events_topic, stalled),
        )
        status, body = await agent.post_events([agent.heartbeat()])
        assert status == 202, body
        accepted_at = time.monotonic()

        async def stall_pages() -> list[Notification]:
            return receiver.received("page", STALLED, "firing")

        await eventually(
            stall_pages, bool, timeout_s=120, interval_s=0.5, what="the stalled-partition page"
        )
        page = receiver.received("page", STALLED, "firing")[0]
        print(f"accepted to the stalled-partition page: {page.received_at - accepted_at:.1f} s")
        assert [a["labels"]["partition"] for a in page.alerts] == [str(stalled)]
        lock.rollback()

    async def resolved() -> list[Notification]:
        return [n for n in receiver.notifications if n.status == "resolved"]

    released_at = time.monotonic()
    await eventually(resolved, bool, timeout_s=30, interval_s=0.5, what="the stall resolved")
    print(f"lock released to the page resolved: {time.monotonic() - released_at:.1f} s")
    assert (
        await monitoring.value(
            f'fleetplane_controller_oldest_pending_age_seconds{{partition="{stalled}"}}'
        )
        == 0
    )
    assert set().union(*(n.names() for n in receiver.notifications)) == {STALLED}

"""Every refusal at every listener of the real edge is a JSON problem, and a
client's fault is never a 5xx: nginx's own refusals (TRACE, a missing Host,
absolute-form targets, an unknown HTTP version), the header limits (431), and
JSON bodies that repeat a key (400 from the API).

Requests are written byte by byte (tests/support/rawhttp.py): aiohttp would
normalise most of them away.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.gateway_auth.ca import CertificateAuthority
from services.gateway_auth.pki import write_agent_certificate
from tests.support.agents import AgentClient, agent_ssl_context
from tests.support.deployment import Deployment
from tests.support.operators import OperatorClient
from tests.support.rawhttp import RawConnection, RawResponse, request_bytes

pytestmark = pytest.mark.timeout(180)

AgentFactory = Callable[[str, str, str], AgentClient]
PROBLEM = "application/problem+json"
MAX_HEADERS = 64
"""The WAF policies' limit (agent.conf 101140, operator.conf 100120)."""

AGENT_PROBE = "/v1/events/ev-probe"
OPERATOR_ROUTE = "/v1/operator/customers/acme/environments"


def extra_headers(count: int, size: int = 1) -> list[tuple[str, str]]:
    return [(f"X-Extra-{i}", "v" * size) for i in range(count)]


def _assert_problem(response: RawResponse, status: int, what: str) -> dict[str, Any]:
    assert response.status == status, (what, response)
    assert response.content_type == PROBLEM, (what, response)
    body: dict[str, Any] = response.json()
    assert body["status"] == status, (what, body)
    assert body["title"], (what, body)
    assert body["detail"], (what, body)
    return body


class Listeners:
    """The three listeners of the running edge, each with the TLS it expects."""

    def __init__(
        self, deployment: Deployment, issuing_ca: CertificateAuthority, tmp_path: Path
    ) -> None:
        stack = deployment.fleet.stack
        cert, key = write_agent_certificate(issuing_ca, tmp_path, "acme", "prod", "agent-1")
        server_only = ssl.create_default_context(cafile=str(stack.pki_dir / "root-ca.pem"))
        self.contexts = {
            "agent": agent_ssl_context(stack.pki_dir, cert, key),
            "operator": server_only,
            "enroll": server_only,
        }
        self.ports = {
            name: int(url.rsplit(":", 1)[1])
            for name, url in (
                ("agent", stack.edge_url),
                ("operator", stack.operator_url),
                ("enroll", stack.enroll_url),
            )
        }

    async def send(self, listener: str, request: bytes) -> RawResponse:
        connection = await RawConnection.open(self.ports[listener], self.contexts[listener])
        async with connection:
            return await connection.exchange(request)


@pytest.fixture
def listeners(
    deployment: Deployment, issuing_ca: CertificateAuthority, tmp_path: Path
) -> Listeners:
    deployment.start_apis()
    return Listeners(deployment, issuing_ca, tmp_path)


ROUTE = {"agent": AGENT_PROBE, "operator": OPERATOR_ROUTE, "enroll": "/v1/enroll"}
LISTENERS = ("agent", "operator", "enroll")


async def test_nginxs_own_refusals_are_problems_on_every_listener(listeners: Listeners) -> None:
    """One deployment for all cases: starting one costs seconds, a case milliseconds."""
    for listener in LISTENERS:
        route = ROUTE[listener]
        cases: list[tuple[str, bytes, int]] = [
            ("TRACE", request_bytes("TRACE", route), 405),
            ("absolute-form", request_bytes("GET", f"https://localhost{route}"), 400),
            (
                "absolute-form, other host",
                request_bytes("GET", f"http://elsewhere.example:8080{route}", version="HTTP/1.0"),
                400,
            ),
            # HTTP/1.0 allows leaving Host out; the edge no longer forwards such
            # a request to a server that answers it in plain text.
            (
                "HTTP/1.0 without Host",
                request_bytes("GET", route, host=None, version="HTTP/1.0"),
                400,
            ),
            ("HTTP/1.1 without Host", request_bytes("GET", route, host=None), 400),
            ("HTTP/3.0 on HTTP/1", request_bytes("GET", route, version="HTTP/3.0"), 505),
            ("asterisk-form", request_bytes("OPTIONS", "*"), 400),
            ("too many headers", request_bytes("GET", route, headers=extra_headers(140)), 431),
            (
                "one header too many",
                request_bytes("GET", route, headers=extra_headers(MAX_HEADERS)),
                431,
            ),
            (
                "a header line over 8 KiB",
                request_bytes("GET", route, headers=extra_headers(1, 9000)),
                431,
            ),
            (
                "headers over 32 KiB",
                request_bytes("GET", route, headers=extra_headers(6, 7000)),
                431,
            ),
        ]
        for what, request, status in cases:
            response = await listeners.send(listener, request)
            body = _assert_problem(response, status, f"{listener}: {what}")
            if status == 405:
                assert response.headers.get("allow"), response
            if what.startswith("absolute-form"):
                assert "absolute URI" in body["detail"]


async def test_what_the_edge_lets_through_is_within_what_the_servers_behind_accept(
    listeners: Listeners,
) -> None:
    """At the limits, requests reach the API and gateway_auth's check and are served."""
    # The Host header counts: with it, exactly the limit.
    at_limit = request_bytes("GET", AGENT_PROBE, headers=extra_headers(MAX_HEADERS - 1))
    response = await listeners.send("agent", at_limit)
    assert response.status == 200, response
    long_line = request_bytes("GET", AGENT_PROBE, headers=extra_headers(1, 8000))
    response = await listeners.send("agent", long_line)
    assert response.status == 200, response
    many_long = request_bytes("GET", AGENT_PROBE, headers=extra_headers(3, 7900))
    response = await listeners.send("agent", many_long)
    assert response.status == 200, response
    # The operator listener: the request reaches the API, which wants a key.
    response = await listeners.send(
        "operator", request_bytes("GET", OPERATOR_ROUTE, headers=extra_headers(MAX_HEADERS - 1))
    )
    _assert_problem(response, 401, "operator at the header limit")


async def _records_on_topic(deployment: Deployment) -> int:
    fleet = deployment.fleet
    consumer = AIOKafkaConsumer(bootstrap_servers=fleet.stack.kafka_bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(fleet.events_topic, p) for p in range(fleet.partitions)]
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


def _with_repeated_key(event: dict[str, Any]) -> bytes:
    text = json.dumps({"events": [event]})
    repeated = text.replace('"health": "ok"', '"health": "ok", "health": "failing"')
    assert repeated != text
    return repeated.encode()


async def test_a_body_repeating_a_json_key_is_refused_through_the_edge(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    agent = agents("acme", "prod", "agent-1")
    event = agent.heartbeat()
    status, body, content_type = await agent.post_raw(_with_repeated_key(event))
    assert (status, content_type) == (400, PROBLEM), body
    assert body["type"] == "urn:fleetplane:problem:duplicate-json-key"
    # Nothing of it reached Kafka; the same event without the repeat does.
    assert await _records_on_topic(deployment) == 0
    status, body = await agent.post_events([event])
    assert status == 202, body
    assert await _records_on_topic(deployment) == 1

    stack = deployment.fleet.stack
    operator = OperatorClient(stack.pki_dir, deployment.operator_key("acme"), stack.operator_url)
    raw = b'{"revision": 1, "revision": 2, "resources": []}'
    status, body = await operator.request_raw(
        "PUT", "/v1/operator/customers/acme/environments/prod/desired-state", raw
    )
    assert status == 400, body
    assert body["type"] == "urn:fleetplane:problem:duplicate-json-key"

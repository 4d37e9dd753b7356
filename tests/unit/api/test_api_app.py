"""The app over real TLS with fake Kafka/PostgreSQL: identity rule, statuses, problem bodies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import pytest
from sqlalchemy.exc import OperationalError

from services.api.repository import EventStatus
from services.api.settings import ApiSettings

from .conftest import (
    AGENT,
    AGENT_LISTENER,
    JSON,
    Client,
    FakeProducer,
    FakeRepository,
    Pki,
    problem,
    serve,
)
from .events_data import batch_body, heartbeat


async def test_valid_batch_from_the_edge_is_accepted_with_the_edge_identity(
    edge: Client, producer: FakeProducer
) -> None:
    body = json.loads(batch_body(heartbeat("e1", 1), heartbeat("e2", 2)))
    # Identity-looking data anywhere but the edge's headers is ignored or refused.
    response = await edge.post(
        "/v1/events?customer_id=other",
        json=body,
        headers={**AGENT, "X-Request-Id": "edge-req-1"},
    )
    assert response.status == 202, await response.text()
    assert await response.json() == {"accepted": ["e1", "e2"]}
    assert response.headers["X-Request-Id"] == "edge-req-1"
    assert [s.key for s in producer.sent] == [b"acme", b"acme"]
    record = json.loads(producer.sent[0].value)
    assert (record["customer_id"], record["environment_id"], record["agent_id"]) == (
        "acme",
        "prod",
        "agent-1",
    )
    assert record["request_id"] == "edge-req-1"


async def test_identity_in_the_body_is_refused(edge: Client, producer: FakeProducer) -> None:
    event = {**heartbeat("e1"), "customer_id": "other"}
    response = await edge.post("/v1/events", data=batch_body(event), headers=AGENT | JSON)
    body = await problem(response, 422)
    assert body["errors"][0]["field"] == "events[0].customer_id"
    assert producer.sent == []


@pytest.mark.parametrize("client_cert", [None, "other-service"], ids=["no-cert", "other-cn"])
async def test_identity_headers_not_from_the_edge_are_403(
    settings: ApiSettings,
    pki: Pki,
    producer: FakeProducer,
    repository: FakeRepository,
    client_cert: str | None,
) -> None:
    async with serve(settings, producer, repository, pki.client_context(client_cert)) as client:
        response = await client.post(
            "/v1/events", data=batch_body(heartbeat("e1")), headers=AGENT | JSON
        )
        body = await problem(response, 403)
        assert body["detail"] == "identity headers are accepted only from the edge"
        response = await client.get("/v1/events/e1", headers=AGENT)
        await problem(response, 403)
        response = await client.post("/v1/events", data=batch_body(heartbeat("e1")), headers=JSON)
        await problem(response, 401)
    assert producer.sent == []
    assert repository.calls == []


async def test_certificate_from_another_ca_cannot_connect(
    settings: ApiSettings, pki: Pki, producer: FakeProducer, repository: FakeRepository
) -> None:
    impostor = pki.client_context("impostor-edge")
    async with serve(settings, producer, repository, impostor) as client:
        with pytest.raises(aiohttp.ClientError):
            await client.post("/v1/events", data=batch_body(heartbeat("e1")), headers=AGENT | JSON)
    assert producer.sent == []


async def test_edge_without_verified_identity_is_401(edge: Client, producer: FakeProducer) -> None:
    for headers in (AGENT_LISTENER, {**AGENT, "X-Fleetplane-Client-Verify": "NONE"}):
        response = await edge.post(
            "/v1/events", data=batch_body(heartbeat("e1")), headers={**headers, **JSON}
        )
        await problem(response, 401)
    assert producer.sent == []


async def test_body_problems(edge: Client, producer: FakeProducer, settings: ApiSettings) -> None:
    text_plain = {**AGENT, "Content-Type": "text/plain"}
    response = await edge.post("/v1/events", data=batch_body(heartbeat("e1")), headers=text_plain)
    await problem(response, 415)

    response = await edge.post("/v1/events", data=b'{"events": [', headers=AGENT | JSON)
    assert "not valid JSON" in (await problem(response, 400))["detail"]

    bad = heartbeat("e1", agent_version="one")
    response = await edge.post("/v1/events", data=batch_body(bad), headers=AGENT | JSON)
    body = await problem(response, 422)
    assert body["errors"][0]["field"] == "events[0].payload.agent_version"

    oversized = b'{"events": [' + b" " * settings.max_body_bytes + b"]}"
    response = await edge.post("/v1/events", data=oversized, headers=AGENT | JSON)
    await problem(response, 413)

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(settings.max_body_bytes // 1024 + 2):
            yield b" " * 1024

    response = await edge.post("/v1/events", data=chunked(), headers=AGENT | JSON)
    await problem(response, 413)
    assert producer.sent == []


async def test_kafka_down_is_503_with_retry_after(edge: Client, producer: FakeProducer) -> None:
    producer.send_blocks = True
    response = await edge.post("/v1/events", data=batch_body(heartbeat("e1")), headers=AGENT | JSON)
    body = await problem(response, 503)
    assert response.headers["Retry-After"] == "7"
    assert "Kafka did not acknowledge" in body["detail"]


async def test_event_status_is_scoped_to_the_caller(
    edge: Client, repository: FakeRepository
) -> None:
    applied_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    repository.records[("acme", "prod", "agent-1", "e1")] = EventStatus(
        "e1", "applied", None, applied_at
    )
    repository.records[("acme", "prod", "agent-2", "e2")] = EventStatus(
        "e2", "rejected", "bad", applied_at
    )
    response = await edge.get("/v1/events/e1", headers=AGENT)
    assert await response.json() == {
        "id": "e1",
        "status": "applied",
        "reason": None,
        "applied_at": "2026-01-02T03:04:05+00:00",
    }
    # Another agent's event id is simply unknown to this caller, whatever the query says.
    response = await edge.get("/v1/events/e2?agent_id=agent-2", headers=AGENT)
    assert await response.json() == {"id": "e2", "status": "pending"}
    assert {identity.agent_id for identity, _ in repository.calls} == {"agent-1"}


async def test_event_status_errors(edge: Client, repository: FakeRepository) -> None:
    response = await edge.get("/v1/events/-bad!id", headers=AGENT)
    assert (await problem(response, 422))["errors"][0]["field"] == "event_id"

    repository.error = OperationalError("SELECT", {}, Exception("connection refused"))
    response = await edge.get("/v1/events/e1", headers=AGENT)
    await problem(response, 503)
    assert response.headers["Retry-After"] == "7"

    repository.error = RuntimeError("secret internals at /srv/db")
    response = await edge.get("/v1/events/e1", headers=AGENT)
    body = await problem(response, 500)
    assert "secret" not in json.dumps(body)
    assert "RuntimeError" not in json.dumps(body)


async def test_routing_errors_are_problems(edge: Client) -> None:
    await problem(await edge.get("/nowhere"), 404)
    response = await edge.delete("/v1/events", headers=AGENT)
    await problem(response, 405)
    assert response.headers["Allow"] == "POST"


async def test_health_readiness_and_metrics_need_no_identity(
    settings: ApiSettings, pki: Pki, producer: FakeProducer, repository: FakeRepository
) -> None:
    async with serve(settings, producer, repository, pki.client_context(None)) as client:
        assert (await client.get("/healthz")).status == 200
        response = await client.get("/readyz")
        assert response.status == 200
        assert (await response.json())["status"] == "ready"

        producer.reachable = False
        body = await problem(await client.get("/readyz"), 503)
        assert body["detail"] == "not ready: Kafka unreachable"
        repository.reachable = False
        body = await problem(await client.get("/readyz"), 503)
        assert body["detail"] == "not ready: Kafka unreachable; PostgreSQL unreachable"

        await client.post("/v1/events", data=b"{}", headers=JSON)
        response = await client.get("/metrics")
        assert response.status == 200
        text = await response.text()
    assert 'fleetplane_api_requests_total{method="GET",route="/readyz",status="503"} 2.0' in text
    assert 'fleetplane_api_batches_refused_total{reason="unauthenticated"} 1.0' in text
    assert "fleetplane_api_request_duration_seconds_bucket" in text
    # The pool, as the controller exports it (the scrape job tells the services apart).
    assert 'fleetplane_database_pool_connections{state="in_use"} 1.0' in text
    assert 'fleetplane_database_pool_connections{state="max"} 10.0' in text
    # Command delivery latency exists from start-up, before any command.
    for became_due in ("during_poll", "before_poll"):
        sample = f'fleetplane_api_command_delivery_seconds_count{{became_due="{became_due}"}}'
        assert f"{sample} 0.0" in text


async def test_unknown_methods_and_routes_do_not_mint_metric_labels(edge: Client) -> None:
    await problem(await edge.request("PROPFIND", "/coffee"), 404)
    await problem(await edge.request("PROPFIND", "/v1/events"), 405)
    text = await (await edge.get("/metrics")).text()
    assert 'method="other",route="unmatched",status="404"' in text
    assert 'method="other",route="unmatched",status="405"' in text
    assert "PROPFIND" not in text
    assert "coffee" not in text

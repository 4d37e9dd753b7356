"""Operator routes through the app: listener rule, keys, scope, desired state to Kafka, reads."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from services.api.repository import EnvironmentRow
from services.api.settings import ApiSettings
from services.shared.events import DesiredStateRecord, decode_topic_record
from services.shared.operator_keys import new_key

from .conftest import (
    AGENT,
    JSON,
    OPERATOR_LISTENER,
    Client,
    FakeProducer,
    FakeRepository,
    Pki,
    audit_row,
    operator,
    problem,
    serve,
)

CUSTOMER = "/v1/operator/customers/acme"
DESIRED = f"{CUSTOMER}/environments/prod/desired-state"


def desired(revision: int | str = 2, **extra: Any) -> dict[str, Any]:
    return {
        "revision": revision,
        "resources": [{"kind": "app", "name": "web", "version": "1.2.0"}],
        **extra,
    }


async def test_desired_state_is_produced_keyed_by_customer(
    edge: Client, producer: FakeProducer, repository: FakeRepository
) -> None:
    key = repository.add_key("acme")
    headers = {**operator(key), "X-Request-Id": "op-req-1"}
    response = await edge.put(DESIRED, json=desired(), headers=headers)
    assert response.status == 202, await response.text()
    answer = await response.json()
    assert answer["revision"] == 2
    assert [(s.topic, s.key) for s in producer.sent] == [("test.events", b"acme")]
    record = decode_topic_record(producer.sent[0].value)
    assert isinstance(record, DesiredStateRecord)
    assert (record.change_id, record.customer_id, record.environment_id) == (
        answer["change_id"],
        "acme",
        "prod",
    )
    assert (record.operator, record.request_id) == (key.key_id, "op-req-1")
    assert record.desired.resources[0].version == "1.2.0"
    assert datetime.now(UTC) - record.accepted_at < timedelta(seconds=5)
    # A second change gets its own id.
    response = await edge.put(DESIRED, json=desired(3), headers=operator(key))
    assert (await response.json())["change_id"] != answer["change_id"]


async def test_operator_key_problems_are_401_and_never_echo_the_token(
    edge: Client, producer: FakeProducer, repository: FakeRepository
) -> None:
    revoked = new_key()  # never stored, as after revocation
    stored = repository.add_key(None)
    wrong_secret = stored.token[:-4] + "AAAA"
    cases = [
        OPERATOR_LISTENER,
        {**OPERATOR_LISTENER, "Authorization": "Bearer nonsense"},
        {**OPERATOR_LISTENER, "Authorization": f"Basic {stored.token}"},
        operator(revoked),
        {**OPERATOR_LISTENER, "Authorization": f"Bearer {wrong_secret}"},
    ]
    for headers in cases:
        response = await edge.put(DESIRED, json=desired(), headers=headers)
        body = await problem(response, 401)
        assert body["type"] == "urn:fleetplane:problem:invalid-operator-key"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        text = json.dumps(body)
        assert "nonsense" not in text
        assert stored.token.split("_", 2)[2][:10] not in text
        assert revoked.token.split("_", 2)[2][:10] not in text
    assert producer.sent == []


@pytest.mark.parametrize("path", [DESIRED, f"{CUSTOMER}/environments", f"{CUSTOMER}/audit"])
async def test_scoped_key_sees_other_customers_as_not_found(
    edge: Client, producer: FakeProducer, repository: FakeRepository, path: str
) -> None:
    other = repository.add_key("other")
    # "acme" exists (it has environments) and "nobody" does not: the same answer.
    repository.environment_rows["acme"] = [EnvironmentRow("prod", None, None, None, 0, 0, 0, 0)]
    method = "PUT" if path == DESIRED else "GET"
    bodies = []
    for customer in ("acme", "nobody"):
        response = await edge.request(
            method, path.replace("acme", customer), json=desired(), headers=operator(other)
        )
        body = await problem(response, 404)
        bodies.append({k: v for k, v in body.items() if k != "request_id"})
    assert bodies[0] == bodies[1]
    assert "acme" not in json.dumps(bodies[0])
    assert producer.sent == []


async def test_unscoped_key_acts_on_any_customer(
    edge: Client, producer: FakeProducer, repository: FakeRepository
) -> None:
    key = repository.add_key(None)
    for customer in ("acme", "other"):
        path = f"/v1/operator/customers/{customer}/environments/prod/desired-state"
        response = await edge.put(path, json=desired(), headers=operator(key))
        assert response.status == 202
    assert [s.key for s in producer.sent] == [b"acme", b"other"]


async def test_agent_certificate_cannot_call_operator_routes(
    edge: Client, producer: FakeProducer, repository: FakeRepository
) -> None:
    key = repository.add_key(None)
    # The agent listener's headers, even with a valid key added.
    response = await edge.put(DESIRED, json=desired(), headers={**AGENT, **operator(key)})
    await problem(response, 403)
    response = await edge.put(
        DESIRED, json=desired(), headers={**AGENT, "Authorization": f"Bearer {key.token}"}
    )
    assert "operator listener" in (await problem(response, 403))["detail"]
    response = await edge.get(f"{CUSTOMER}/environments", headers=AGENT)
    await problem(response, 403)
    assert producer.sent == []
    assert repository.key_lookups == []


async def test_operator_request_with_client_headers_is_403(
    edge: Client, producer: FakeProducer, repository: FakeRepository
) -> None:
    key = repository.add_key(None)
    headers = {**operator(key), "X-Fleetplane-Client-DN": "CN=agent-1,OU=prod,O=acme"}
    response = await edge.put(DESIRED, json=desired(), headers=headers)
    assert "client certificate headers" in (await problem(response, 403))["detail"]
    assert producer.sent == []


async def test_operator_listener_cannot_call_agent_routes(
    edge: Client, producer: FakeProducer, repository: FakeRepository
) -> None:
    key = repository.add_key(None)
    response = await edge.post(
        "/v1/events", data=b'{"events": []}', headers={**operator(key), **JSON}
    )
    assert "agent listener" in (await problem(response, 403))["detail"]
    response = await edge.get("/v1/commands?wait=0", headers=operator(key))
    await problem(response, 403)


@pytest.mark.parametrize("client_cert", [None, "other-service"], ids=["no-cert", "other-cn"])
async def test_operator_headers_not_from_the_edge(
    settings: ApiSettings,
    pki: Pki,
    producer: FakeProducer,
    repository: FakeRepository,
    client_cert: str | None,
) -> None:
    key = repository.add_key(None)
    async with serve(settings, producer, repository, pki.client_context(client_cert)) as client:
        response = await client.put(DESIRED, json=desired(), headers=operator(key))
        assert "only from the edge" in (await problem(response, 403))["detail"]
        bearer_only = {"Authorization": f"Bearer {key.token}"}
        response = await client.put(DESIRED, json=desired(), headers=bearer_only)
        await problem(response, 401)
    assert producer.sent == []
    assert repository.key_lookups == []


async def test_desired_state_body_and_path_problems(
    edge: Client, producer: FakeProducer, repository: FakeRepository, settings: ApiSettings
) -> None:
    key = repository.add_key(None)
    headers = operator(key)
    text_plain = {**headers, "Content-Type": "text/plain"}
    await problem(await edge.put(DESIRED, data=json.dumps(desired()), headers=text_plain), 415)
    await problem(await edge.put(DESIRED, data=b"{", headers={**headers, **JSON}), 400)
    oversized = b" " * (settings.max_body_bytes + 1)
    await problem(await edge.put(DESIRED, data=oversized, headers={**headers, **JSON}), 413)

    strict = [
        (desired(0), "revision"),
        (desired(revision="2"), "revision"),
        (desired(customer_id="other"), "customer_id"),
        ({**desired(), "resources": [{"kind": "App", "name": "web", "version": "1"}]},
         "resources[0].kind"),
        ({**desired(), "resources": 2 * desired()["resources"]}, "$"),
    ]  # fmt: skip
    for body, field in strict:
        response = await edge.put(DESIRED, json=body, headers=headers)
        errors = (await problem(response, 422))["errors"]
        assert errors[0]["field"] == field, errors

    for path, field in (
        ("/v1/operator/customers/ACME/environments/prod/desired-state", "customer_id"),
        (f"{CUSTOMER}/environments/pr_od/desired-state", "environment_id"),
    ):
        response = await edge.put(path, json=desired(), headers=headers)
        assert (await problem(response, 422))["errors"][0]["field"] == field
    assert producer.sent == []


async def test_desired_state_when_kafka_is_down_is_503(
    edge: Client, producer: FakeProducer, repository: FakeRepository
) -> None:
    producer.send_blocks = True
    response = await edge.put(DESIRED, json=desired(), headers=operator(repository.add_key(None)))
    body = await problem(response, 503)
    assert response.headers["Retry-After"] == "7"
    assert "retry the change" in body["detail"]
    assert producer.sent == []


async def test_key_lookup_when_the_database_is_down_is_503(
    edge: Client, repository: FakeRepository
) -> None:
    key = repository.add_key(None)
    repository.error = OperationalError("SELECT", {}, Exception("connection refused"))
    response = await edge.get(f"{CUSTOMER}/environments", headers=operator(key))
    await problem(response, 503)
    assert response.headers["Retry-After"] == "7"


async def test_environments_with_liveness(edge: Client, repository: FakeRepository) -> None:
    now = datetime.now(UTC)
    repository.environment_rows["acme"] = [
        EnvironmentRow("staging", now - timedelta(seconds=60), "1.0.0", "degraded", 2, 1, 3, 2),
        EnvironmentRow("prod", now - timedelta(seconds=2), "1.2.3", "ok", 5, 5, 0, 3),
        EnvironmentRow("old", now - timedelta(hours=1), "0.9.0", "failing", 1, 1, 0, 1),
        EnvironmentRow("new", None, None, None, 1, 0, 2, 0),
    ]
    key = repository.add_key("acme")
    response = await edge.get(f"{CUSTOMER}/environments", headers=operator(key))
    assert response.status == 200, await response.text()
    environments = (await response.json())["environments"]
    assert [(e["environment_id"], e["liveness"]) for e in environments] == [
        ("new", "never_seen"),
        ("old", "lost"),
        ("prod", "connected"),
        ("staging", "unknown"),
    ]
    assert environments[3] == {
        "environment_id": "staging",
        "liveness": "unknown",
        "last_heartbeat_at": (now - timedelta(seconds=60)).isoformat(),
        "agent_version": "1.0.0",
        "health": "degraded",
        "desired_revision": 2,
        "observed_revision": 1,
        "pending_commands": 3,
        "agents": 2,
    }
    response = await edge.get("/v1/operator/customers/empty/environments", headers=operator(key))
    await problem(response, 404)


async def test_audit(edge: Client, repository: FakeRepository) -> None:
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    repository.audit_rows["acme"] = [
        audit_row(f"c{i}", "prod", "0123456789ab", "set_desired_state", i, "applied", None,
                 f"r{i}", at, at)
        for i in range(3, 0, -1)
    ]  # fmt: skip
    key = repository.add_key(None)
    response = await edge.get(f"{CUSTOMER}/audit?limit=2", headers=operator(key))
    entries = (await response.json())["entries"]
    assert [e["change_id"] for e in entries] == ["c3", "c2"]
    assert entries[0]["accepted_at"] == "2026-03-01T12:00:00+00:00"
    for bad in ("0", "501", "x", "1&limit=2"):
        response = await edge.get(f"{CUSTOMER}/audit?limit={bad}", headers=operator(key))
        assert (await problem(response, 422))["errors"][0]["field"] == "limit"

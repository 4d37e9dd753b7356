"""The OpenAPI document matches the app: routes, path parameters, statuses and answer shapes.

Every (route, status) the document lists is produced through the real app here,
and the answer is validated against the schema the document gives for it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from sqlalchemy.exc import OperationalError

from services.api.app import create_app
from services.api.openapi import OPERATIONS, OPERATIONS_BY_NAME, build_openapi, path_parameters
from services.api.repository import EnvironmentRow
from services.api.settings import ApiSettings
from services.shared.operator_auth import StoredOperatorKey
from services.shared.operator_keys import new_key

from .conftest import (
    AGENT,
    AGENT_LISTENER,
    JSON,
    OPERATOR_LISTENER,
    FakeProducer,
    FakeRepository,
    Pki,
    audit_row,
    fake_dependencies,
    operator,
    serve,
)
from .events_data import batch_body, heartbeat
from .test_api_longpoll import command

DOCUMENT = build_openapi()
KEY = new_key()
"""Stored in every scenario's repository; may act on every customer."""
SCOPED = new_key()
"""Stored too; may act on customer "other" only."""
OPERATOR = operator(KEY)
DESIRED = b'{"revision": 2, "resources": [{"kind": "app", "name": "web", "version": "1.0"}]}'
DB_DOWN = OperationalError("SELECT", {}, Exception("connection refused"))


def routes(app: web.Application) -> dict[tuple[str, str], web.AbstractRoute]:
    """(method, path template) of every route, without the HEAD twin aiohttp adds to GETs."""
    found: dict[tuple[str, str], web.AbstractRoute] = {}
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        found[(route.method, route.resource.canonical)] = route
    return found


def documented() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in DOCUMENT["paths"].items()
        for method, operation in item.items()
    }


def test_document_is_valid_openapi_3_1() -> None:
    OpenAPIV31SpecValidator(DOCUMENT).validate()
    assert DOCUMENT["openapi"].startswith("3.1")
    # Generated from the models: the shared contracts are all there.
    for name in ("EventBatch", "DesiredState", "CommandsReply", "ProblemDetails"):
        assert name in DOCUMENT["components"]["schemas"]
    assert "$defs" not in json.dumps(DOCUMENT)


def test_every_route_is_documented_and_vice_versa(settings: ApiSettings) -> None:
    # Both come from OPERATIONS; this catches a route added to the app by other means.
    app = create_app(settings, dependencies=fake_dependencies(FakeProducer(), FakeRepository()))
    registered = routes(app)
    assert set(registered) == set(documented())
    for key, route in registered.items():
        assert documented()[key]["operationId"] == route.name
        assert route.name is not None
        assert route.handler is OPERATIONS_BY_NAME[route.name].handler
    assert len(OPERATIONS_BY_NAME) == len(OPERATIONS) == len(registered)


def test_path_parameters_match_the_routes(settings: ApiSettings) -> None:
    app = create_app(settings, dependencies=fake_dependencies(FakeProducer(), FakeRepository()))
    for (method, path), operation in documented().items():
        route = routes(app)[(method, path)]
        assert route.resource is not None
        in_route = re.findall(r"{([^}:]+)", route.resource.canonical)
        in_document = [p["name"] for p in operation.get("parameters", []) if p["in"] == "path"]
        assert in_document == in_route == path_parameters(path), (method, path)


def test_security_is_documented_per_audience() -> None:
    schemes = DOCUMENT["components"]["securitySchemes"]
    assert schemes["agentCertificate"]["type"] == "mutualTLS"
    assert schemes["operatorKey"] == {**schemes["operatorKey"], "type": "http", "scheme": "bearer"}
    for (_, path), operation in documented().items():
        security = operation["security"]
        if path.startswith("/v1/operator/"):
            assert security == [{"operatorKey": []}]
        elif path.startswith("/v1/"):
            assert security == [{"agentCertificate": []}]
        else:
            assert security == []


def test_every_problem_answer_is_a_problem_reference() -> None:
    for operation in documented().values():
        for status, response in operation["responses"].items():
            if status == "default" or int(status) >= 400:
                assert response["$ref"].startswith("#/components/responses/")
    for response in DOCUMENT["components"]["responses"].values():
        assert list(response["content"]) == ["application/problem+json"]


# --- every documented status, produced through the app ------------------------------


def _keys(repository: FakeRepository) -> None:
    for key, customer in ((KEY, None), (SCOPED, "other")):
        repository.keys[key.key_id] = StoredOperatorKey(key.key_id, key.secret_sha256, customer)


def _fill(producer: FakeProducer, repository: FakeRepository) -> None:
    at = datetime(2026, 3, 1, tzinfo=UTC)
    repository.commands[("acme", "prod")] = [command(1), command(2, "delete")]
    repository.environment_rows["acme"] = [
        EnvironmentRow("prod", at, "1.2.3", "ok", 2, 1, 1, 2),
        EnvironmentRow("new", None, None, None, 0, 0, 0, 0),
    ]
    repository.audit_rows["acme"] = [
        audit_row("c1", "prod", KEY.key_id, "set_desired_state", 2, "applied", None, "r", at, at),
        audit_row("c0", "prod", KEY.key_id, "set_desired_state", 1, "stale", "old", None, at, at),
    ]


def _kafka_down(producer: FakeProducer, repository: FakeRepository) -> None:
    producer.send_blocks = True
    producer.reachable = False


def _database_down(producer: FakeProducer, repository: FakeRepository) -> None:
    repository.error = DB_DOWN


@dataclass(frozen=True)
class Scenario:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    setup: Callable[[FakeProducer, FakeRepository], None] = _fill
    certificate: str | None = "edge-client"


_BIG = b" " * (64 * 1024 + 1)
"""Above the test settings' max_body_bytes."""
_ENVS = "/v1/operator/customers/acme/environments"
_AUDIT = "/v1/operator/customers/acme/audit"
_PUT = "/v1/operator/customers/acme/environments/prod/desired-state"
_EVENT_BODY = batch_body(heartbeat("e1"))
_SCOPED = operator(SCOPED)
_BAD_KEY = operator(new_key())
_AGENT_JSON = {**AGENT, **JSON}
_OPERATOR_JSON = {**OPERATOR, **JSON}
_TEXT = {"Content-Type": "text/plain"}

SCENARIOS: dict[tuple[str, int], Scenario] = {
    ("healthz", 200): Scenario("GET", "/healthz", certificate=None),
    ("readyz", 200): Scenario("GET", "/readyz", certificate=None),
    ("readyz", 503): Scenario("GET", "/readyz", setup=_kafka_down, certificate=None),
    ("metrics", 200): Scenario("GET", "/metrics", certificate=None),
    ("openapi", 200): Scenario("GET", "/openapi.json", certificate=None),
    ("post_events", 202): Scenario("POST", "/v1/events", _AGENT_JSON, _EVENT_BODY),
    ("post_events", 400): Scenario("POST", "/v1/events", _AGENT_JSON, b'{"events": ['),
    ("post_events", 401): Scenario("POST", "/v1/events", {**AGENT_LISTENER, **JSON}, _EVENT_BODY),
    ("post_events", 403): Scenario("POST", "/v1/events", _OPERATOR_JSON, _EVENT_BODY),
    ("post_events", 413): Scenario("POST", "/v1/events", _AGENT_JSON, _BIG),
    ("post_events", 415): Scenario("POST", "/v1/events", {**AGENT, **_TEXT}, _EVENT_BODY),
    ("post_events", 422): Scenario("POST", "/v1/events", _AGENT_JSON, b'{"events": []}'),
    ("post_events", 503): Scenario(
        "POST", "/v1/events", _AGENT_JSON, _EVENT_BODY, setup=_kafka_down
    ),
    ("get_event", 200): Scenario("GET", "/v1/events/e1", AGENT),
    ("get_event", 401): Scenario("GET", "/v1/events/e1", AGENT_LISTENER),
    ("get_event", 403): Scenario("GET", "/v1/events/e1", AGENT, certificate=None),
    ("get_event", 422): Scenario("GET", "/v1/events/-bad!", AGENT),
    ("get_event", 503): Scenario("GET", "/v1/events/e1", AGENT, setup=_database_down),
    ("get_commands", 200): Scenario("GET", "/v1/commands?wait=0", AGENT),
    ("get_commands", 401): Scenario("GET", "/v1/commands?wait=0", AGENT_LISTENER),
    ("get_commands", 403): Scenario("GET", "/v1/commands?wait=0", OPERATOR),
    ("get_commands", 422): Scenario("GET", "/v1/commands?wait=99", AGENT),
    ("get_commands", 503): Scenario("GET", "/v1/commands", AGENT, setup=_database_down),
    ("put_desired_state", 202): Scenario("PUT", _PUT, _OPERATOR_JSON, DESIRED),
    ("put_desired_state", 400): Scenario("PUT", _PUT, _OPERATOR_JSON, b"{"),
    ("put_desired_state", 401): Scenario("PUT", _PUT, {**_BAD_KEY, **JSON}, DESIRED),
    ("put_desired_state", 403): Scenario("PUT", _PUT, {**_OPERATOR_JSON, **AGENT}, DESIRED),
    ("put_desired_state", 404): Scenario("PUT", _PUT, {**_SCOPED, **JSON}, DESIRED),
    ("put_desired_state", 413): Scenario("PUT", _PUT, _OPERATOR_JSON, _BIG),
    ("put_desired_state", 415): Scenario("PUT", _PUT, {**OPERATOR, **_TEXT}, DESIRED),
    ("put_desired_state", 422): Scenario("PUT", _PUT, _OPERATOR_JSON, b'{"revision": 1}'),
    ("put_desired_state", 503): Scenario(
        "PUT", _PUT, _OPERATOR_JSON, DESIRED, setup=_kafka_down
    ),
    ("get_environments", 200): Scenario("GET", _ENVS, OPERATOR),
    ("get_environments", 401): Scenario("GET", _ENVS, _BAD_KEY),
    ("get_environments", 403): Scenario("GET", _ENVS, AGENT),
    ("get_environments", 404): Scenario("GET", _ENVS, _SCOPED),
    ("get_environments", 422): Scenario("GET", _ENVS.replace("acme", "ACME"), OPERATOR),
    ("get_environments", 503): Scenario("GET", _ENVS, OPERATOR, setup=_database_down),
    ("get_audit", 200): Scenario("GET", _AUDIT, OPERATOR),
    ("get_audit", 401): Scenario("GET", _AUDIT, OPERATOR_LISTENER),
    ("get_audit", 403): Scenario("GET", _AUDIT, OPERATOR, certificate=None),
    ("get_audit", 404): Scenario("GET", _AUDIT, _SCOPED),
    ("get_audit", 422): Scenario("GET", _AUDIT + "?limit=0", OPERATOR),
    ("get_audit", 503): Scenario("GET", _AUDIT, OPERATOR, setup=_database_down),
}  # fmt: skip


def test_every_documented_status_has_a_scenario() -> None:
    wanted = {(op.name, status) for op in OPERATIONS for status in op.statuses}
    assert set(SCENARIOS) == wanted


def _resolve(reference: dict[str, Any]) -> dict[str, Any]:
    if "$ref" not in reference:
        return reference
    target: Any = DOCUMENT
    for part in reference["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    assert isinstance(target, dict)
    return target


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    # The schema's $refs point into the document's components.
    root = {**schema, "components": DOCUMENT["components"]}
    return Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)


@pytest.mark.parametrize(("name", "status"), sorted(SCENARIOS), ids=lambda v: str(v))
async def test_documented_status_is_answered_as_documented(
    settings: ApiSettings, pki: Pki, name: str, status: int
) -> None:
    scenario = SCENARIOS[(name, status)]
    operation = OPERATIONS_BY_NAME[name]
    producer, repository = FakeProducer(), FakeRepository()
    _keys(repository)
    scenario.setup(producer, repository)
    client_ssl = pki.client_context(scenario.certificate)
    async with serve(settings, producer, repository, client_ssl) as client:
        response = await client.request(
            scenario.method, scenario.path, headers=scenario.headers, data=scenario.body
        )
        assert response.status == status, await response.text()
        raw = await response.read()

    documented_response = _resolve(
        documented()[(operation.method, operation.path)]["responses"][str(status)]
    )
    for header in documented_response.get("headers", {}):
        assert header in response.headers, header
    (media_type, content), *_ = documented_response["content"].items()
    assert response.content_type == media_type
    if media_type.endswith("json"):
        errors = sorted(
            _validator(content["schema"]).iter_errors(json.loads(raw)), key=lambda e: e.path
        )
        assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_example_request_bodies_match_their_schemas() -> None:
    for name, body in (("put_desired_state", DESIRED), ("post_events", _EVENT_BODY)):
        operation = documented()[(OPERATIONS_BY_NAME[name].method, OPERATIONS_BY_NAME[name].path)]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        errors = [e.message for e in _validator(schema).iter_errors(json.loads(body))]
        assert errors == [], name

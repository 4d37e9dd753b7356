"""The OpenAPI 3.1 description of the API, served at ``GET /openapi.json``.

``OPERATIONS`` lists every route with its handler and the statuses it can answer;
both the router (``routes.py``) and this document are built from it, so a route
cannot exist in one and not the other. The schemas are generated from the
pydantic models the handlers use (request contracts in ``services.shared``,
answers in ``models.py``), never written by hand. A unit test checks that path
parameters match, that every documented status is actually answered, and that
answers match their schemas.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import KW_ONLY, dataclass
from typing import Any, Final, Literal

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from services.api import handlers, models
from services.api.longpoll import DEFAULT_WAIT_S, MAX_TAKEN
from services.api.operators import AUDIT_LIMIT_DEFAULT, AUDIT_LIMIT_MAX
from services.shared.commands import MAX_WAIT_S, CommandsReply
from services.shared.events import DesiredState, EventBatch, EventId, Identifier
from services.shared.problems import PROBLEM_CONTENT_TYPE, WWW_AUTHENTICATE

OPENAPI_VERSION: Final = "3.1.0"
API_VERSION: Final = "1.2.0"
"""1.1.0: every service names invalid fields one way (see the 422 response).
1.2.0: ``GET /v1/commands`` takes ``taken`` (commands the agent already took)."""
REF_TEMPLATE: Final = "#/components/schemas/{model}"

Audience = Literal["public", "agent", "operator"]
AGENT_SECURITY: Final = "agentCertificate"
OPERATOR_SECURITY: Final = "operatorKey"


@dataclass(frozen=True, slots=True)
class QueryParameter:
    name: str
    schema: dict[str, Any]
    description: str


@dataclass(frozen=True, slots=True)
class Operation:
    """One route: what it takes, who may call it, and every status its handler answers."""

    name: str
    """The aiohttp route name (``routes.py``); also the operationId."""
    method: str
    path: str
    summary: str
    description: str
    audience: Audience
    status: int
    """The success status."""
    answer: type[BaseModel] | None
    """Model of the success body; None for the special bodies (metrics, this document)."""
    errors: tuple[int, ...] = ()
    """Problem statuses the handler answers (500 for unexpected failures is implied)."""
    body: type[BaseModel] | None = None
    query: tuple[QueryParameter, ...] = ()
    _: KW_ONLY
    handler: Handler
    """What answers it (``handlers.py``)."""

    @property
    def statuses(self) -> frozenset[int]:
        return frozenset((self.status, *self.errors))


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the OpenAPI 3.1 description of every route; needs no identity."""
    return web.Response(text=openapi_text(), content_type="application/json")


_WAIT = QueryParameter(
    "wait",
    {"type": "integer", "minimum": 0, "maximum": MAX_WAIT_S, "default": DEFAULT_WAIT_S},
    "Longest time in seconds to hold the request while the environment has no due commands.",
)
_TAKEN = QueryParameter(
    "taken",
    {
        "type": "string",
        "pattern": rf"^[0-9]{{1,19}}(,[0-9]{{1,19}}){{0,{MAX_TAKEN - 1}}}$",
        "examples": ["1041,1042"],
    },
    f"Ids of commands the agent already took (at most {MAX_TAKEN}, comma-separated): they "
    "are not offered again, and with no other command due the request is held as if "
    "there were none. Without it every pending command is offered, as after a restart.",
)
_LIMIT = QueryParameter(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": AUDIT_LIMIT_MAX, "default": AUDIT_LIMIT_DEFAULT},
    "How many entries to return at most.",
)
_STORABLE: Final = (
    "Every accepted value can be stored as it is: a value PostgreSQL would refuse is "
    "refused here with 422 naming the field (free text without U+0000 or unpaired "
    "surrogate escapes; integers within bigint; ASCII ids and names short enough for "
    "the indexes), so an accepted change is always applied."
)
_AGENT_ERRORS: Final = (401, 403)
_OPERATOR_ERRORS: Final = (401, 403, 404, 422, 503)
_CUSTOMER: Final = "/v1/operator/customers/{customer_id}"

OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation(
        "healthz",
        "GET",
        "/healthz",
        "Liveness",
        "Answers while the process's event loop runs; checks no dependency.",
        "public",
        200,
        models.HealthReply,
        handler=handlers.healthz,
    ),
    Operation(
        "readyz",
        "GET",
        "/readyz",
        "Readiness",
        "200 when Kafka answers a metadata request and PostgreSQL a query, else 503.",
        "public",
        200,
        models.ReadyReply,
        errors=(503,),
        handler=handlers.readyz,
    ),
    Operation(
        "metrics",
        "GET",
        "/metrics",
        "Prometheus metrics",
        "The process's metrics in the Prometheus text exposition format.",
        "public",
        200,
        None,
        handler=handlers.metrics,
    ),
    Operation(
        "openapi",
        "GET",
        "/openapi.json",
        "This document",
        "The OpenAPI 3.1 description of every route.",
        "public",
        200,
        None,
        handler=openapi_json,
    ),
    Operation(
        "post_events",
        "POST",
        "/v1/events",
        "Report events",
        "Accepts a batch of heartbeats, observed-state reports and command results. "
        "202 only after Kafka acknowledged every event; on 503 retry the same batch "
        "with the same event ids (the controller deduplicates). Event ids must be "
        "unique within a batch (a rule JSON Schema cannot state): a batch that repeats "
        "one is refused whole with 422. Identity comes from the client certificate "
        "only, never from the body. " + _STORABLE,
        "agent",
        202,
        models.EventsAccepted,
        errors=(400, *_AGENT_ERRORS, 413, 415, 422, 503),
        body=EventBatch,
        handler=handlers.post_events,
    ),
    Operation(
        "get_event",
        "GET",
        "/v1/events/{event_id}",
        "One of the caller's events",
        "What the controller recorded for an event this agent sent; ``pending`` until "
        "then, and for any id this agent did not send.",
        "agent",
        200,
        models.EventStatusReply,
        errors=(*_AGENT_ERRORS, 422, 503),
        handler=handlers.get_event,
    ),
    Operation(
        "get_commands",
        "GET",
        "/v1/commands",
        "Long-poll for commands",
        "The caller's environment's pending, due commands, oldest first (at most 100). "
        "Without any, the request is held until one is created or ``wait`` seconds "
        "passed, then answered with an empty list. Apply a command only if its epoch "
        "is not older than the newest epoch seen; report the outcome with a "
        "command_result event. Poll again after ``next_poll_s`` seconds (0 after "
        "commands; jittered after an empty answer).",
        "agent",
        200,
        CommandsReply,
        errors=(*_AGENT_ERRORS, 422, 503),
        query=(_WAIT, _TAKEN),
        handler=handlers.get_commands,
    ),
    Operation(
        "put_desired_state",
        "PUT",
        _CUSTOMER + "/environments/{environment_id}/desired-state",
        "Set an environment's desired state",
        "Produces the change to the customer's partition of the events topic; 202 once "
        "Kafka acknowledged it. The owning controller applies it in order, ignores a "
        "revision not above the environment's current one, records it in the audit "
        "and creates the commands that move the environment towards it. " + _STORABLE,
        "operator",
        202,
        models.DesiredStateAccepted,
        errors=(400, *_OPERATOR_ERRORS, 413, 415),
        body=DesiredState,
        handler=handlers.put_desired_state,
    ),
    Operation(
        "get_environments",
        "GET",
        _CUSTOMER + "/environments",
        "A customer's environments",
        "Every environment the controller recorded for the customer, sorted by id, with "
        "liveness derived now from the last heartbeat (connected, unknown, lost, "
        "never_seen).",
        "operator",
        200,
        models.EnvironmentsReply,
        errors=_OPERATOR_ERRORS,
        handler=handlers.get_environments,
    ),
    Operation(
        "get_audit",
        "GET",
        _CUSTOMER + "/audit",
        "A customer's operator audit",
        "Operator changes as the controller applied (or refused) them, newest first.",
        "operator",
        200,
        models.AuditReply,
        errors=_OPERATOR_ERRORS,
        query=(_LIMIT,),
        handler=handlers.get_audit,
    ),
)

OPERATIONS_BY_NAME: Final = {operation.name: operation for operation in OPERATIONS}

_PATH_PARAMETERS: Final[dict[str, tuple[Any, str]]] = {
    "event_id": (
        EventId,
        "An event id this agent chose, sent as it is; a ':' may also be written as %3A. "
        "The edge refuses any other percent-encoding in a path (403).",
    ),
    "customer_id": (Identifier, "The customer; must be within the operator key's scope."),
    "environment_id": (Identifier, "One of the customer's environments."),
}
_PATH_PARAMETER_RE: Final = re.compile(r"{([^}]+)}")

# Problem status -> (components/responses name, description); 401 differs for operators.
_PROBLEMS: Final[dict[int, tuple[str, str]]] = {
    400: ("MalformedRequest", "The body is not valid JSON."),
    401: (
        "Unauthenticated",
        "No verified identity: not from the edge, or the edge verified no agent certificate.",
    ),
    403: (
        "Forbidden",
        "Identity or listener headers from anyone but the edge, a route of the other "
        "listener, or client-certificate headers on an operator request; or the edge's "
        "firewall refused the request (on agent routes, anything outside their grammar: "
        "percent-encoding in a path other than %3A, a query parameter other than wait and "
        "taken).",
    ),
    404: (
        "NotFound",
        "No such customer for this operator key (the same whether or not it exists).",
    ),
    413: ("PayloadTooLarge", "The body, or one record made from it, is too large."),
    415: ("UnsupportedMediaType", "The body is not application/json."),
    422: (
        "ValidationFailed",
        "The input failed validation; ``errors`` names each field JSON-path-like from the "
        "body's root: ``events[3].payload.health`` (list items by index in brackets, keys "
        "after dots, ``$`` for the whole body); path and query parameters by their name. "
        "Every Fleetplane service names fields this way (gateway_auth said "
        "``events.3.payload`` and ``body`` before API version 1.1.0).",
    ),
    503: (
        "ServiceUnavailable",
        "A dependency (Kafka or PostgreSQL) is unavailable, the process is starting (its "
        "certificate revocation state is not loaded yet), or the service is shedding load "
        "(problem type ``urn:fleetplane:problem:overloaded``: more requests in flight than "
        "it takes); nothing was accepted. Retry the same request after Retry-After seconds, "
        "with jitter.",
    ),
}
_OPERATOR_401: Final = (
    "OperatorUnauthenticated",
    "No valid operator key: missing, malformed, unknown, revoked or wrong.",
)


def path_parameters(path: str) -> list[str]:
    """Names of the ``{...}`` parameters of a path template, in order."""
    return _PATH_PARAMETER_RE.findall(path)


_Refs = dict[tuple[Any, JsonSchemaMode], dict[str, Any]]


def _schemas() -> tuple[_Refs, dict[str, Any]]:
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (models.ProblemDetails, "serialization")
    ]
    for operation in OPERATIONS:
        if operation.body is not None:
            wanted.append((operation.body, "validation"))
        if operation.answer is not None:
            wanted.append((operation.answer, "serialization"))
    refs, top = models_json_schema(list(dict.fromkeys(wanted)), ref_template=REF_TEMPLATE)
    return refs, dict(top.get("$defs", {}))


def _json_content(schema: dict[str, Any], media_type: str = "application/json") -> dict[str, Any]:
    return {media_type: {"schema": schema}}


def _headers(*names: str) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


def _components(schemas: dict[str, Any]) -> dict[str, Any]:
    problem = {"$ref": REF_TEMPLATE.format(model="ProblemDetails")}
    responses: dict[str, Any] = {}
    for status, (name, description) in (*_PROBLEMS.items(), (401, _OPERATOR_401)):
        headers = ["X-Request-Id"]
        if status == 503:
            headers.append("Retry-After")
        if name == _OPERATOR_401[0]:
            headers.append("WWW-Authenticate")
        responses[name] = {
            "description": description,
            "headers": _headers(*headers),
            "content": _json_content(problem, PROBLEM_CONTENT_TYPE),
        }
    responses["InternalError"] = {
        "description": "Unexpected failure; logged with the request id, no internals answered.",
        "headers": _headers("X-Request-Id"),
        "content": _json_content(problem, PROBLEM_CONTENT_TYPE),
    }
    return {
        "schemas": schemas,
        "responses": responses,
        "headers": {
            "X-Request-Id": {
                "description": "The request's id (the edge's when it sent one); in logs too.",
                "schema": {"type": "string"},
            },
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer", "minimum": 1},
            },
            "WWW-Authenticate": {
                "description": "The scheme to authenticate with.",
                "schema": {"type": "string", "const": WWW_AUTHENTICATE},
            },
        },
        "securitySchemes": {
            AGENT_SECURITY: {
                "type": "mutualTLS",
                "description": (
                    "Agents present their client certificate (SPIFFE URI SAN and "
                    "CN=<agent>,OU=<environment>,O=<customer>) to the edge's agent "
                    "listener. The edge forwards the verified identity to the API over "
                    "its own mutual-TLS connection; identity headers from anyone else "
                    "are refused with 403."
                ),
            },
            OPERATOR_SECURITY: {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "fpk_<key id>_<secret>",
                "description": (
                    "Operator API key, on the edge's operator listener only. A key is "
                    "scoped to one customer or to all; other customers answer 404."
                ),
            },
        },
    }


def _success(operation: Operation, refs: _Refs) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": operation.summary,
        "headers": _headers("X-Request-Id"),
    }
    if operation.answer is not None:
        response["content"] = _json_content(refs[(operation.answer, "serialization")])
    elif operation.name == "metrics":
        response["content"] = _json_content({"type": "string"}, "text/plain")
    else:
        response["content"] = _json_content({"type": "object"})
    return response


def _operation(operation: Operation, refs: _Refs) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = []
    for name in path_parameters(operation.path):
        annotation, description = _PATH_PARAMETERS[name]
        parameters.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "description": description,
                "schema": TypeAdapter(annotation).json_schema(),
            }
        )
    for query in operation.query:
        parameters.append(
            {
                "name": query.name,
                "in": "query",
                "required": False,
                "description": query.description,
                "schema": query.schema,
            }
        )
    responses: dict[str, Any] = {str(operation.status): _success(operation, refs)}
    for status in sorted(operation.errors):
        name = _PROBLEMS[status][0]
        if status == 401 and operation.audience == "operator":
            name = _OPERATOR_401[0]
        responses[str(status)] = {"$ref": f"#/components/responses/{name}"}
    responses["default"] = {"$ref": "#/components/responses/InternalError"}
    document: dict[str, Any] = {
        "operationId": operation.name,
        "summary": operation.summary,
        "description": operation.description,
        "tags": [operation.audience],
        "security": {
            "public": [],
            "agent": [{AGENT_SECURITY: []}],
            "operator": [{OPERATOR_SECURITY: []}],
        }[operation.audience],
        "responses": responses,
    }
    if parameters:
        document["parameters"] = parameters
    if operation.body is not None:
        document["requestBody"] = {
            "required": True,
            "content": _json_content(refs[(operation.body, "validation")]),
        }
    return document


def build_openapi() -> dict[str, Any]:
    """A fresh OpenAPI 3.1 document (a plain JSON-compatible dict) for every operation."""
    refs, schemas = _schemas()
    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        paths.setdefault(operation.path, {})[operation.method.lower()] = _operation(operation, refs)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Fleetplane API",
            "version": API_VERSION,
            "description": (
                "Agents report events and long-poll for commands over mutual TLS; "
                "operators set desired state and watch their environments with API "
                "keys. Every error is an RFC 9457 problem (application/problem+json)."
            ),
        },
        "tags": [
            {"name": "agent", "description": "For agents, through the edge's agent listener."},
            {"name": "operator", "description": "For operators, through the operator listener."},
            {"name": "public", "description": "Health, metrics and this document."},
        ],
        "paths": paths,
        "components": _components(schemas),
    }


@functools.cache
def openapi_text() -> str:
    """The document as JSON text, built once per process."""
    return json.dumps(build_openapi(), separators=(",", ":"))

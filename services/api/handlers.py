"""HTTP handlers: translate between HTTP and the service layer, nothing more."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from services.api.auth import SERIAL_HEADER, identity_from_request
from services.api.keys import EVENTS, METRICS, PRODUCER, REPOSITORY, REQUEST_ID, SETTINGS
from services.api.problems import (
    FieldError,
    PayloadTooLarge,
    Problem,
    ServiceUnavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from services.shared.events import EventId
from services.shared.identity import AgentIdentity

log = logging.getLogger(__name__)

READINESS_TIMEOUT_S: Final = 1.0
_EVENT_ID: Final[TypeAdapter[str]] = TypeAdapter(EventId)
_TRACE_HEADERS: Final = ("traceparent", "tracestate")
_DATABASE_DOWN: Final = (OperationalError, InterfaceError, PoolTimeoutError)


def agent_identity(request: web.Request) -> AgentIdentity:
    """The calling agent, as verified by the edge. Raises Unauthenticated or Forbidden."""
    transport = request.transport
    peer_cert = transport.get_extra_info("peercert") if transport is not None else None
    identity = identity_from_request(
        request.headers.items(), peer_cert, edge_cn=request.app[SETTINGS].edge_client_cn
    )
    log.debug(
        "agent %s (certificate serial %s)",
        identity.spiffe_uri,
        request.headers.get(SERIAL_HEADER, "?"),
    )
    return identity


async def read_json_body(request: web.Request) -> bytes:
    """The raw body of a JSON request. Raises UnsupportedMediaType or PayloadTooLarge."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"send the body as application/json, not {request.content_type[:64]}"
        )
    limit = request.app[SETTINGS].max_body_bytes
    too_large = PayloadTooLarge(f"the body must be at most {limit} bytes; send smaller batches")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise too_large from e


async def post_events(request: web.Request) -> web.Response:
    """``POST /v1/events``: 202 ``{"accepted": [ids]}`` once Kafka acknowledged every event."""
    try:
        identity = agent_identity(request)
        body = await read_json_body(request)
        accepted = await request.app[EVENTS].accept(
            body,
            identity,
            request_id=request[REQUEST_ID],
            trace_carrier={h: request.headers[h] for h in _TRACE_HEADERS if h in request.headers},
        )
    except ServiceUnavailable:
        raise
    except Problem as refused:
        request.app[METRICS].batches_refused.labels(reason=refused.slug).inc()
        raise
    return web.json_response({"accepted": accepted}, status=202)


async def get_event(request: web.Request) -> web.Response:
    """``GET /v1/events/{event_id}``: what became of one of the caller's own events."""
    identity = agent_identity(request)
    event_id = request.match_info["event_id"]
    try:
        _EVENT_ID.validate_python(event_id)
    except ValidationError as e:
        message = e.errors(include_url=False, include_input=False)[0]["msg"]
        raise ValidationFailed(
            "the event id in the path is not a valid event id",
            errors=(FieldError("event_id", message),),
        ) from e
    try:
        found = await request.app[REPOSITORY].event_status(identity, event_id)
    except _DATABASE_DOWN as e:
        log.warning("event status lookup failed: %s", e)
        raise ServiceUnavailable(
            "the fleet database is unavailable; retry later",
            retry_after_s=request.app[SETTINGS].retry_after_s,
        ) from e
    if found is None:
        return web.json_response({"id": event_id, "status": "pending"})
    return web.json_response(
        {
            "id": found.event_id,
            "status": found.status,
            "reason": found.reason,
            "applied_at": found.applied_at.isoformat(),
        }
    )


async def healthz(request: web.Request) -> web.Response:
    """Liveness: answers while the event loop runs; checks no dependency."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 when Kafka answers a metadata request and PostgreSQL a query, else 503."""
    settings = request.app[SETTINGS]
    kafka, database = await asyncio.gather(
        _probe(
            "Kafka",
            request.app[PRODUCER].check(settings.kafka.events_topic, READINESS_TIMEOUT_S),
        ),
        _probe("PostgreSQL", request.app[REPOSITORY].ping()),
    )
    down = [name for name, ok in (("Kafka", kafka), ("PostgreSQL", database)) if not ok]
    if down:
        raise ServiceUnavailable(
            f"not ready: {' and '.join(down)} unreachable", retry_after_s=settings.retry_after_s
        )
    return web.json_response({"status": "ready", "checks": {"kafka": "ok", "postgresql": "ok"}})


async def _probe(name: str, check: Awaitable[None]) -> bool:
    try:
        await asyncio.wait_for(check, READINESS_TIMEOUT_S)
    # Any failure means "not ready"; the reason goes to the log, not the answer.
    except Exception as e:
        log.warning("readiness: %s check failed: %s: %s", name, type(e).__name__, e)
        return False
    return True


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this app's own registry."""
    payload = generate_latest(request.app[METRICS].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})

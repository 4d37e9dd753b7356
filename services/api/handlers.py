"""HTTP handlers: translate between HTTP and the service layer, nothing more."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, TypeAdapter, ValidationError

from services.api.keys import (
    EVENTS,
    METRICS,
    OPERATORS,
    POLLER,
    PRODUCER,
    REPOSITORY,
    REQUEST_ID,
    SETTINGS,
    SIGNALS,
    WATCH,
)
from services.api.longpoll import parse_taken, parse_wait
from services.api.models import (
    AuditEntry,
    AuditReply,
    DesiredStateAccepted,
    EnvironmentsReply,
    EventsAccepted,
    EventStatusReply,
    HealthReply,
    ReadyReply,
)
from services.api.operators import (
    AUDIT_LIMIT_DEFAULT,
    AUDIT_LIMIT_MAX,
    OperatorKey,
    environment_views,
)
from services.shared.commands import CommandsReply
from services.shared.edge_auth import (
    AgentCertificate,
    agent_certificate_from_request,
    operator_credentials_from_request,
)
from services.shared.events import EventId
from services.shared.identity import AgentIdentity
from services.shared.params import limit_param, path_id
from services.shared.problems import (
    CertificateRevoked,
    FieldError,
    Problem,
    ServiceUnavailable,
    ValidationFailed,
)
from services.shared.web.body import read_json_body as read_body
from services.shared.web.database import database_errors as shared_database_errors
from services.shared.web.tls import peer_cert as _peer_cert

log = logging.getLogger(__name__)

READINESS_TIMEOUT_S: Final = 1.0
_EVENT_ID: Final[TypeAdapter[str]] = TypeAdapter(EventId)
_TRACE_HEADERS: Final = ("traceparent", "tracestate")


def _trace_carrier(request: web.Request) -> dict[str, str]:
    return {h: request.headers[h] for h in _TRACE_HEADERS if h in request.headers}


def database_errors(request: web.Request, what: str) -> AbstractContextManager[None]:
    """Turn an unreachable database inside the block into a 503 with Retry-After."""
    return shared_database_errors(
        what,
        retry_after_s=request.app[SETTINGS].retry_after_s,
        detail="the fleet database is unavailable; retry later",
    )


async def agent_certificate(request: web.Request) -> AgentCertificate:
    """The calling agent's certificate, as the edge verified it, once it passed the check.

    The check (``services.shared.certificate_check``) refuses a revoked
    certificate, one of a retired or unknown issuing CA and one with ambiguous
    names: 403 ``certificate-refused``. Before refusing what a change whose
    NOTIFY is still on the way would allow (a CA just registered, a certificate
    just issued), it asks the database. Raises Unauthenticated or Forbidden for
    a request that is not an agent's through the edge.
    """
    certificate = agent_certificate_from_request(
        request.headers.items(),
        _peer_cert(request),
        edge_cn=request.app[SETTINGS].edge_client_cn,
    )
    with database_errors(request, "certificate check lookup"):
        reason = await request.app[WATCH].check.check_against(certificate, request.app[REPOSITORY])
    if reason is not None:
        raise CertificateRevoked(reason)
    log.debug(
        "agent %s (certificate serial %s)", certificate.identity.spiffe_uri, certificate.serial
    )
    return certificate


async def agent_identity(request: web.Request) -> AgentIdentity:
    """``agent_certificate``'s identity; same errors."""
    return (await agent_certificate(request)).identity


async def read_json_body(request: web.Request) -> bytes:
    """The raw body of a JSON request. Raises UnsupportedMediaType or PayloadTooLarge."""
    return await read_body(request, request.app[SETTINGS].max_body_bytes)


async def post_events(request: web.Request) -> web.Response:
    """``POST /v1/events``: 202 ``{"accepted": [ids]}`` once Kafka acknowledged every event."""
    try:
        identity = await agent_identity(request)
        body = await read_json_body(request)
        accepted = await request.app[EVENTS].accept(
            body,
            identity,
            request_id=request[REQUEST_ID],
            trace_carrier=_trace_carrier(request),
        )
    except ServiceUnavailable:
        raise
    except Problem as refused:
        request.app[METRICS].batches_refused.labels(reason=refused.slug).inc()
        raise
    return _json(EventsAccepted(accepted=accepted), status=202)


async def get_event(request: web.Request) -> web.Response:
    """``GET /v1/events/{event_id}``: what became of one of the caller's own events."""
    identity = await agent_identity(request)
    event_id = request.match_info["event_id"]
    try:
        _EVENT_ID.validate_python(event_id)
    except ValidationError as e:
        message = e.errors(include_url=False, include_input=False)[0]["msg"]
        raise ValidationFailed(
            "the event id in the path is not a valid event id",
            errors=(FieldError("event_id", message),),
        ) from e
    with database_errors(request, "event status lookup"):
        found = await request.app[REPOSITORY].event_status(identity, event_id)
    if found is None:
        # Only the fields that are set: a pending event has no reason or time yet.
        return _json(EventStatusReply(id=event_id, status="pending"))
    return _json(
        EventStatusReply(
            id=found.event_id,
            status=found.status,
            reason=found.reason,
            applied_at=found.applied_at,
        )
    )


async def get_commands(request: web.Request) -> web.Response:
    """``GET /v1/commands?wait=<s>&taken=<ids>``: the caller's environment's due commands
    (long poll), but for those it already took.

    A poll whose certificate is revoked while it waits ends at once with 403.
    """
    certificate = await agent_certificate(request)
    identity = certificate.identity
    wait_s = parse_wait(request.query.getall("wait", []))
    taken = parse_taken(request.query.getall("taken", []))
    watch = request.app[WATCH]
    with watch.watch(certificate) as revoked:
        if revoked.is_set():
            raise CertificateRevoked("the client certificate was revoked")
        poll = asyncio.ensure_future(
            _commands(request, identity.customer_id, identity.environment_id, wait_s, taken)
        )
        revocation = asyncio.ensure_future(revoked.wait())
        try:
            await asyncio.wait({poll, revocation}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            revocation.cancel()
            if not poll.done():
                poll.cancel()
        if not poll.done() or poll.cancelled():
            with contextlib.suppress(asyncio.CancelledError):
                await poll
            watch.check.observe_longpoll_refusal(certificate)
            raise CertificateRevoked("the client certificate was revoked while the poll waited")
    return _json(poll.result())


async def _commands(
    request: web.Request,
    customer_id: str,
    environment_id: str,
    wait_s: int,
    taken: frozenset[int],
) -> CommandsReply:
    with database_errors(request, "commands lookup"):
        return await request.app[POLLER].poll(customer_id, environment_id, wait_s, taken)


async def operator_key(request: web.Request) -> OperatorKey:
    """The calling operator's verified key. Raises OperatorUnauthenticated, Forbidden or 503."""
    credentials = operator_credentials_from_request(
        request.headers.items(),
        _peer_cert(request),
        edge_cn=request.app[SETTINGS].edge_client_cn,
    )
    with database_errors(request, "operator key lookup"):
        key = await request.app[OPERATORS].authenticate(credentials)
    log.debug("operator key %s", key.key_id)
    return key


async def _operator_customer(request: web.Request) -> tuple[OperatorKey, str]:
    """The verified key and the path's customer, which the key may act on (else 404)."""
    key = await operator_key(request)
    customer_id = path_id("customer_id", request.match_info["customer_id"])
    key.require_customer(customer_id)
    return key, customer_id


async def put_desired_state(request: web.Request) -> web.Response:
    """``PUT /v1/operator/customers/{c}/environments/{e}/desired-state``: 202 once on Kafka."""
    key, customer_id = await _operator_customer(request)
    environment_id = path_id("environment_id", request.match_info["environment_id"])
    body = await read_json_body(request)
    record = await request.app[EVENTS].accept_desired_state(
        body,
        customer_id=customer_id,
        environment_id=environment_id,
        operator=key.key_id,
        request_id=request[REQUEST_ID],
        trace_carrier=_trace_carrier(request),
    )
    log.info(
        "operator key %s set %s/%s to revision %d (change %s)",
        key.key_id,
        customer_id,
        environment_id,
        record.desired.revision,
        record.change_id,
    )
    accepted = DesiredStateAccepted(change_id=record.change_id, revision=record.desired.revision)
    return _json(accepted, status=202)


async def get_environments(request: web.Request) -> web.Response:
    """``GET /v1/operator/customers/{c}/environments``: each environment with its liveness."""
    _, customer_id = await _operator_customer(request)
    settings = request.app[SETTINGS]
    with database_errors(request, "environments lookup"):
        rows = await request.app[REPOSITORY].environments(customer_id)
    views = environment_views(
        rows,
        datetime.now(UTC),
        connected_s=settings.liveness_connected_s,
        lost_s=settings.liveness_lost_s,
    )
    return _json(EnvironmentsReply(environments=views))


async def get_audit(request: web.Request) -> web.Response:
    """``GET /v1/operator/customers/{c}/audit?limit=``: latest applied changes, newest first."""
    _, customer_id = await _operator_customer(request)
    limit = limit_param(request.query, maximum=AUDIT_LIMIT_MAX, default=AUDIT_LIMIT_DEFAULT)
    with database_errors(request, "audit lookup"):
        rows = await request.app[REPOSITORY].audit(customer_id, limit=limit)
    entries = [AuditEntry.model_validate(r, from_attributes=True) for r in rows]
    return _json(AuditReply(entries=entries))


def _json(reply: BaseModel, *, status: int = 200) -> web.Response:
    # exclude_unset: optional fields a handler did not set are left out, not null.
    # Serialised once, by pydantic, rather than to a dict and then by json.dumps.
    return web.Response(
        text=reply.model_dump_json(exclude_unset=True),
        status=status,
        content_type="application/json",
    )


async def healthz(request: web.Request) -> web.Response:
    """Liveness: answers while the event loop runs; checks no dependency."""
    return _json(HealthReply(status="ok"))


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
    down = [
        f"{name} unreachable" for name, ok in (("Kafka", kafka), ("PostgreSQL", database)) if not ok
    ]
    if not request.app[WATCH].loaded:
        # Every agent request needs the trust state; it loads once LISTEN is up.
        down.append("revocation state not loaded yet")
    if down:
        raise ServiceUnavailable(
            f"not ready: {'; '.join(down)}", retry_after_s=settings.retry_after_s
        )
    return _json(ReadyReply(status="ready", checks={"kafka": "ok", "postgresql": "ok"}))


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
    exported = request.app[METRICS]
    for state, connections in request.app[REPOSITORY].pool_use().items():
        exported.database_pool.labels(state).set(connections)
    signals = request.app.get(SIGNALS)
    exported.long_polls_waiting.set(signals.waiting if signals is not None else 0)
    payload = generate_latest(exported.registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})

"""HTTP handlers of gateway_auth: parse, authenticate, call the service, answer."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Final, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from services.gateway_auth import expiry
from services.gateway_auth.keys import (
    METRICS,
    OPERATORS,
    REQUEST_ID,
    SERVICE,
    SETTINGS,
    STORE,
    TRUST,
)
from services.gateway_auth.models import (
    AuditItem,
    AuditList,
    CertificateIssued,
    EnrollRequest,
    RenewRequest,
    RevocationRecorded,
    RevocationRequest,
    TokenCreated,
    TokenRequest,
)
from services.gateway_auth.service import IssuedAgentCertificate
from services.gateway_auth.store import NewToken
from services.shared.db import pool_use
from services.shared.edge_auth import (
    agent_certificate_from_request,
    is_edge,
    operator_credentials_from_request,
)
from services.shared.identity_journal import JournalUnavailable
from services.shared.params import limit_param, path_id
from services.shared.problems import (
    FieldError,
    NotFound,
    ServiceUnavailable,
    Unauthenticated,
    ValidationFailed,
)
from services.shared.web.body import parse_json_model, read_json_body
from services.shared.web.database import database_errors
from services.shared.web.tls import peer_cert as _peer_cert

log = logging.getLogger(__name__)

AUDIT_LIMIT_DEFAULT: Final = 100
AUDIT_LIMIT_MAX: Final = 500
MAX_BODY_BYTES: Final = 64 * 1024
Body = TypeVar("Body", bound=BaseModel)


def _database(request: web.Request) -> AbstractContextManager[None]:
    return database_errors(
        "identity database",
        retry_after_s=request.app[SETTINGS].retry_after_s,
        detail="the identity database is unavailable; retry later",
        # The identity journal (Kafka) refusing an entry rolls the change back: the
        # same "retry later" as the database being down.
        also=(OSError, JournalUnavailable),
    )


async def _body(request: web.Request, model: type[Body]) -> Body:
    raw = await read_json_body(request, MAX_BODY_BYTES)
    return parse_json_model(raw, model, "request body")


def _json(reply: BaseModel, *, status: int = 200) -> web.Response:
    return web.json_response(reply.model_dump(mode="json"), status=status)


def _issued(issued: IssuedAgentCertificate) -> CertificateIssued:
    certificate = issued.certificate
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return CertificateIssued(
        certificate_chain=issued.chain_pem,
        serial=issued.serial,
        spiffe_id=issued.spiffe_id,
        not_after=end,
        renew_after=start + timedelta(seconds=(end - start).total_seconds() * 2 / 3),
    )


async def _operator(request: web.Request) -> tuple[str, str]:
    """(actor, customer id of the path) for a verified operator key that may act on it."""
    credentials = operator_credentials_from_request(
        request.headers.items(), _peer_cert(request), edge_cn=request.app[SETTINGS].edge_client_cn
    )
    with _database(request):
        key = await request.app[OPERATORS].authenticate(credentials)
    customer_id = path_id("customer_id", request.match_info["customer_id"])
    key.require_customer(customer_id)
    return f"operator:{key.key_id}", customer_id


async def create_token(request: web.Request) -> web.Response:
    actor, customer_id = await _operator(request)
    body = await _body(request, TokenRequest)
    settings = request.app[SETTINGS]
    ttl_s = body.ttl_s if body.ttl_s is not None else settings.token_ttl_s
    if ttl_s > settings.token_ttl_max_s:
        raise ValidationFailed(
            "ttl_s is too long",
            errors=(FieldError("ttl_s", f"must be at most {settings.token_ttl_max_s}"),),
        )
    new = NewToken((customer_id, body.environment_id, body.agent_id), ttl_s, actor)
    with _database(request):
        token, token_id, expires_at = await request.app[SERVICE].create_token(
            new, request_id=request[REQUEST_ID]
        )
    return _json(
        TokenCreated(
            token=token,
            token_id=token_id,
            customer_id=customer_id,
            environment_id=body.environment_id,
            agent_id=body.agent_id,
            expires_at=expires_at,
        ),
        status=201,
    )


async def revoke(request: web.Request) -> web.Response:
    actor, customer_id = await _operator(request)
    body = await _body(request, RevocationRequest)
    with _database(request):
        revocation_id, revoked_at, covered = await request.app[STORE].revoke(
            customer_id=customer_id,
            environment_id=body.environment_id,
            agent_id=body.agent_id,
            revoked_by=actor,
            reason=body.reason,
            request_id=request[REQUEST_ID],
        )
    log.info(
        "revocation %d of %s/%s/%s by %s",
        revocation_id,
        customer_id,
        body.environment_id,
        body.agent_id or "*",
        actor,
    )
    return _json(
        RevocationRecorded(
            revocation_id=revocation_id,
            customer_id=customer_id,
            environment_id=body.environment_id,
            agent_id=body.agent_id,
            revoked_at=revoked_at,
            certificates=covered,
        ),
        status=201,
    )


async def audit(request: web.Request) -> web.Response:
    _, customer_id = await _operator(request)
    limit = limit_param(request.query, maximum=AUDIT_LIMIT_MAX, default=AUDIT_LIMIT_DEFAULT)
    with _database(request):
        rows = await request.app[STORE].audit(customer_id, limit=limit)
    return _json(AuditList(entries=[AuditItem.model_validate(row) for row in rows]))


def _from_edge_listener(request: web.Request, listener: str) -> None:
    """Enrollment has no client identity: require only the edge and its enrollment listener."""
    if not is_edge(_peer_cert(request), request.app[SETTINGS].edge_client_cn):
        raise Unauthenticated("requests must come through the edge")
    if request.headers.getall("X-Fleetplane-Listener", []) != [listener]:
        raise NotFound("no such resource")


async def enroll(request: web.Request) -> web.Response:
    _from_edge_listener(request, "enroll")
    body = await _body(request, EnrollRequest)
    with _database(request):
        issued = await request.app[SERVICE].enroll(
            body.token, body.csr, request_id=request[REQUEST_ID]
        )
    return _json(_issued(issued), status=201)


async def renew(request: web.Request) -> web.Response:
    current = agent_certificate_from_request(
        request.headers.items(), _peer_cert(request), edge_cn=request.app[SETTINGS].edge_client_cn
    )
    body = await _body(request, RenewRequest)
    with _database(request):
        issued = await request.app[SERVICE].renew(current, body.csr, request_id=request[REQUEST_ID])
    return _json(_issued(issued), status=201)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 once the trust state is loaded and PostgreSQL answers."""
    if request.app[TRUST].state is None:
        raise ServiceUnavailable("not ready: revocations not loaded yet", retry_after_s=1)
    with _database(request):
        await request.app[STORE].operator_key("000000000000")
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    expiry.refresh(
        request.app[METRICS].certificate_expiry,
        {
            "edge-server": settings.edge_server_cert,
            "internal-server": settings.tls_cert,
            "internal-ca": settings.edge_ca,
            "issuing-ca": settings.issuing_ca_cert,
            "root-ca": settings.root_ca_cert,
        },
    )
    pool = request.app[METRICS].database_pool
    for state, connections in pool_use(request.app[STORE].engine).items():
        pool.labels(state).set(connections)
    payload = generate_latest(request.app[METRICS].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/healthz", healthz)
    router.add_get("/readyz", readyz)
    router.add_get("/metrics", metrics)
    router.add_post("/v1/enroll", enroll)
    router.add_post("/v1/renew", renew)
    customer = "/v1/operator/customers/{customer_id}"
    router.add_post(customer + "/enrollment-tokens", create_token)
    router.add_post(customer + "/revocations", revoke)
    router.add_get(customer + "/identity-audit", audit)

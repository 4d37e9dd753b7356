"""Building the gateway_auth application: ``create_app(settings)``.

Routes (all behind the edge, over the internal mTLS hop):

- ``POST /v1/enroll``: enrollment listener (no client certificate; token + CSR).
- ``POST /v1/renew``: agent listener (the current certificate; CSR).
- ``GET /v1/internal/authz``: nginx's ``auth_request`` on every agent request.
- ``POST /v1/operator/customers/{c}/enrollment-tokens``,
  ``POST /v1/operator/customers/{c}/revocations``,
  ``GET /v1/operator/customers/{c}/identity-audit``: operator listener, bearer keys.
- ``/healthz``, ``/readyz``, ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from services.gateway_auth import handlers
from services.gateway_auth.admission import admission
from services.gateway_auth.keys import METRICS, REQUEST_ID, SERVICE, SETTINGS, STORE, TRUST
from services.gateway_auth.service import GatewayMetrics, IdentityService, IssuingCa, TrustKeeper
from services.gateway_auth.settings import GatewayAuthSettings
from services.gateway_auth.store import IdentityStore
from services.shared.db import create_engine
from services.shared.identity_journal import IdentityJournal
from services.shared.logs import current_request_id
from services.shared.notify import StateFollower
from services.shared.problems import (
    PROBLEM_CONTENT_TYPE,
    Problem,
    http_problem_body,
    problem_body,
)
from services.shared.revocations import IDENTITY_CHANNEL

log = logging.getLogger(__name__)

_REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_BODY_BYTES: Final = 64 * 1024


def _problem(status: int, body: dict[str, object], headers: dict[str, str] | None) -> web.Response:
    return web.json_response(
        body, status=status, headers=headers, content_type=PROBLEM_CONTENT_TYPE
    )


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, metrics, and every error as an RFC 9457 problem (5xx without internals)."""
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _REQUEST_ID_RE.fullmatch(incoming) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    token = current_request_id.set(request_id)
    started = time.perf_counter()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except Problem as problem:
        log.info(
            "%s %s answered %d: %s", request.method, request.path, problem.status, problem.detail
        )
        response = _problem(
            problem.status, problem_body(problem, request_id=request_id), dict(problem.headers)
        )
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        detail = "no such resource" if e.status == 404 else e.reason
        response = _problem(
            e.status, http_problem_body(e.status, detail, request_id=request_id), headers
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        body = http_problem_body(
            500, "the server failed to handle this request; it was logged", request_id=request_id
        )
        response = _problem(500, body, None)
    finally:
        current_request_id.reset(token)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    method = request.method if request.method in _KNOWN_METHODS else "other"
    request.app[METRICS].requests.labels(
        route=route, method=method, status=str(response.status)
    ).inc()
    request.app[METRICS].request_duration.labels(route=route, method=method).observe(
        time.perf_counter() - started
    )
    response.headers["X-Request-Id"] = request_id
    return response


def create_app(settings: GatewayAuthSettings) -> web.Application:
    """The gateway_auth application; nothing connects until it starts."""
    app = web.Application(
        middlewares=[_middleware, admission().middleware], client_max_size=MAX_BODY_BYTES
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics = GatewayMetrics.create()
    app[TRUST] = trust = TrustKeeper(metrics)

    @asynccontextmanager
    async def database_ctx(app: web.Application) -> AsyncIterator[None]:
        engine = create_engine(settings.database, application_name="fleetplane-gateway-auth")
        journal = IdentityJournal(settings.kafka.kafka_bootstrap, settings.kafka.identity_topic)
        await journal.start()
        app[STORE] = IdentityStore(engine, journal)
        try:
            yield
        finally:
            await engine.dispose()
            await journal.stop()

    @asynccontextmanager
    async def service_ctx(app: web.Application) -> AsyncIterator[None]:
        service = IdentityService(
            store=app[STORE],
            issuing=IssuingCa(settings.issuing_ca_cert, settings.issuing_ca_key),
            trust=trust,
            metrics=metrics,
            agent_validity=timedelta(seconds=settings.agent_validity_s),
        )
        app[SERVICE] = service
        await service.register_issuer()
        yield

    @asynccontextmanager
    async def follower_ctx(app: web.Application) -> AsyncIterator[None]:
        follower = StateFollower(
            settings.database.libpq_dsn,
            IDENTITY_CHANNEL,
            trust.reload,
            interval_s=settings.trust_reload_s,
            name="fleetplane-gateway-auth-trust",
        )
        async with follower.running():
            started = time.monotonic()
            await asyncio.wait_for(follower.loaded.wait(), 30)
            log.info("trust state loaded in %.2f s", time.monotonic() - started)
            yield

    app.cleanup_ctx.extend([database_ctx, service_ctx, follower_ctx])
    handlers.setup_routes(app)
    return app

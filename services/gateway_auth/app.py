"""Building the gateway_auth application: ``create_app(settings)``.

Routes (all behind the edge, over the internal mTLS hop):

- ``POST /v1/enroll``: enrollment listener (no client certificate; token + CSR).
- ``POST /v1/renew``: agent listener (the current certificate; CSR).
- ``POST /v1/operator/customers/{c}/enrollment-tokens``,
  ``POST /v1/operator/customers/{c}/revocations``,
  ``GET /v1/operator/customers/{c}/identity-audit``: operator listener, bearer keys.
- ``/healthz``, ``/readyz``, ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, Final

import psycopg
from aiohttp import web

from services.gateway_auth import handlers
from services.gateway_auth.admission import admission
from services.gateway_auth.keys import METRICS, OPERATORS, SERVICE, SETTINGS, STORE, TRUST
from services.gateway_auth.service import GatewayMetrics, IdentityService, IssuingCa
from services.gateway_auth.settings import GatewayAuthSettings
from services.gateway_auth.store import IdentityStore
from services.shared.certificate_check import CertificateCheck
from services.shared.channels import IDENTITY_CHANNEL
from services.shared.db import create_engine
from services.shared.identity_journal import IdentityJournal
from services.shared.notify import psycopg_follower, reloading
from services.shared.operator_auth import OperatorAuthenticator
from services.shared.revocations import load_trust_state
from services.shared.web.middlewares import http_middlewares

log = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = handlers.MAX_BODY_BYTES


def create_app(settings: GatewayAuthSettings) -> web.Application:
    """The gateway_auth application; nothing connects until it starts."""
    app = web.Application(
        middlewares=[
            *http_middlewares(lambda app: app[METRICS], service="gateway_auth"),
            admission().middleware,
        ],
        client_max_size=MAX_BODY_BYTES,
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics = GatewayMetrics.create()
    app[TRUST] = trust = CertificateCheck(metrics.certificate_checks, metrics.revocation_delay)

    async def reload_trust(connection: psycopg.AsyncConnection[Any]) -> None:
        trust.state = await load_trust_state(connection)

    @asynccontextmanager
    async def database_ctx(app: web.Application) -> AsyncIterator[None]:
        engine = create_engine(settings.database, application_name="fleetplane-gateway-auth")
        journal = IdentityJournal(settings.kafka.kafka_bootstrap, settings.kafka.identity_topic)
        await journal.start()
        app[STORE] = store = IdentityStore(engine, journal)
        # No cache: a revoked key stops at once here (the API caches for a second).
        app[OPERATORS] = OperatorAuthenticator(store, cache_s=0)
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
        follower = psycopg_follower(
            settings.database.libpq_dsn,
            [reloading(IDENTITY_CHANNEL, reload_trust, settings.trust_reload_s)],
            name="fleetplane-gateway-auth-listen",
        )
        async with follower.running():
            started = time.monotonic()
            await asyncio.wait_for(follower.loaded.wait(), 30)
            log.info("trust state loaded in %.2f s", time.monotonic() - started)
            yield

    app.cleanup_ctx.extend([database_ctx, service_ctx, follower_ctx])
    handlers.setup_routes(app)
    return app

"""Typed keys of what the app and each request carry (no module-level singletons)."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from services.gateway_auth.service import GatewayMetrics, IdentityService
from services.gateway_auth.settings import GatewayAuthSettings
from services.gateway_auth.store import IdentityStore
from services.shared.certificate_check import CertificateCheck
from services.shared.operator_auth import OperatorAuthenticator
from services.shared.web.middlewares import REQUEST_ID as REQUEST_ID

SETTINGS: Final = web.AppKey("settings", GatewayAuthSettings)
METRICS: Final = web.AppKey("metrics", GatewayMetrics)
STORE: Final = web.AppKey("store", IdentityStore)
OPERATORS: Final = web.AppKey("operators", OperatorAuthenticator)
SERVICE: Final = web.AppKey("service", IdentityService)
TRUST: Final = web.AppKey("trust", CertificateCheck)

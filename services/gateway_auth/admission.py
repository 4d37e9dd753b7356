"""gateway_auth's bound on in-flight work (services/shared/admission.py).

One lane, ``other``: enrollment, renewal and the operator routes, which sign
certificates or write PostgreSQL; over its limit a request gets 503 with
Retry-After at once. Health, readiness and metrics are never counted nor
refused. (The per-request certificate check runs in the API, not here:
services/shared/certificate_check.py.)
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from services.shared.admission import Admission

UNCOUNTED_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
OTHER_LIMIT: Final = 64


def lane(request: web.Request) -> str | None:
    """The lane of ``request``, or None for the probes that are never refused."""
    if request.path in UNCOUNTED_PATHS:
        return None
    return "other"


def admission() -> Admission:
    return Admission(lane, {"other": OTHER_LIMIT}, retry_after_s=1)

"""gateway_auth's lanes of bounded in-flight work (services/shared/admission.py).

* ``check``: the edge's per-request certificate check (``/v1/internal/authz``),
  a lookup in memory answered in well under a millisecond; more than this in
  flight means the process is behind, and a check answered late is worth less
  than one refused at once (the edge turns either into 503 with Retry-After for
  the agent, infra/nginx/edge.conf.template).
* ``other``: enrollment, renewal and the operator routes, which sign
  certificates or write PostgreSQL.

Health, readiness and metrics are never counted nor refused. The edge bounds the
checks it sends too (max_conns on gateway_auth's server line), so this is the
second line; it matters when something other than the edge calls.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from services.shared.admission import Admission

UNCOUNTED_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
CHECK_LIMIT: Final = 256
OTHER_LIMIT: Final = 64


def lane(request: web.Request) -> str | None:
    """The lane of ``request``, or None for the probes that are never refused."""
    if request.path == "/v1/internal/authz":
        return "check"
    if request.path in UNCOUNTED_PATHS:
        return None
    return "other"


def admission() -> Admission:
    return Admission(lane, {"check": CHECK_LIMIT, "other": OTHER_LIMIT}, retry_after_s=1)

"""Request id, request metrics, and the one place where exceptions become HTTP answers."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Final, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import Counter, Histogram

from services.shared.events import REQUEST_ID_PATTERN
from services.shared.logs import current_request_id
from services.shared.problems import (
    PROBLEM_CONTENT_TYPE,
    Problem,
    http_problem_body,
    problem_body,
)

log = logging.getLogger(__name__)

REQUEST_ID_HEADER: Final = "X-Request-Id"
REQUEST_ID: Final = web.RequestKey("request_id", str)
"""The request's id, set by ``request_id_middleware`` before any handler runs."""
# Ids from the edge are reused so logs line up; anything else is replaced, since
# the value ends up in logs, records and metrics exemplars. The records' contract
# holds it to the same pattern (operator_audit.request_id is text).
_REQUEST_ID_RE: Final = re.compile(REQUEST_ID_PATTERN)
# A hostile client must not be able to mint label values.
_KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpMetrics(Protocol):
    """The two collectors every HTTP service keeps (labels: route, method[, status])."""

    @property
    def requests(self) -> Counter: ...

    @property
    def request_duration(self) -> Histogram: ...


def problem_response(
    status: int, body: dict[str, object], headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        body, status=status, headers=headers, content_type=PROBLEM_CONTENT_TYPE
    )


def http_middlewares(
    metrics_of: Callable[[web.Application], HttpMetrics], *, service: str
) -> list[Middleware]:
    """The middlewares of an HTTP service, outermost first.

    ``metrics_of`` finds the app's collectors (they may be created in a cleanup
    context, so they are looked up per request); ``service`` names the server in
    the detail of a 413 from aiohttp's own body limit.
    """
    return [request_id_middleware, metrics_middleware(metrics_of), problem_middleware(service)]


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every request an id (the edge's ``X-Request-Id`` when well-formed) and echo it."""
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = incoming if _REQUEST_ID_RE.fullmatch(incoming) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    token = current_request_id.set(request_id)
    try:
        response = await handler(request)
    finally:
        current_request_id.reset(token)
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


def metrics_middleware(metrics_of: Callable[[web.Application], HttpMetrics]) -> Middleware:
    """Count and time every answer by route template, method and final status."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = "499"  # nginx's code for a client that went away before the answer
        try:
            response = await handler(request)
            status = str(response.status)
            return response
        finally:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            method = request.method if request.method in _KNOWN_METHODS else "other"
            metrics = metrics_of(request.app)
            metrics.requests.labels(route=route, method=method, status=status).inc()
            metrics.request_duration.labels(route=route, method=method).observe(
                time.perf_counter() - started
            )

    return middleware


def problem_middleware(service: str) -> Middleware:
    """Turn every error into an RFC 9457 problem answer; 5xx bodies never carry internals."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request.get(REQUEST_ID)
        try:
            return await handler(request)
        except Problem as problem:
            level = logging.WARNING if problem.status >= 500 else logging.INFO
            log.log(
                level,
                "%s %s answered %d: %s",
                request.method,
                request.path,
                problem.status,
                problem.detail,
            )
            return problem_response(
                problem.status, problem_body(problem, request_id=request_id), dict(problem.headers)
            )
        except web.HTTPException as e:
            if e.status < 400:
                raise
            headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            detail = _http_detail(request, e, service)
            return problem_response(
                e.status, http_problem_body(e.status, detail, request_id=request_id), headers
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            body = http_problem_body(
                500,
                "the server failed to handle this request; it was logged with the request id",
                request_id=request_id,
            )
            return problem_response(500, body)

    return middleware


def _http_detail(request: web.Request, error: web.HTTPException, service: str) -> str:
    if isinstance(error, web.HTTPNotFound):
        return "no such resource"
    if isinstance(error, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(error.allowed_methods))
        return f"method {request.method[:16]} is not allowed here; allowed: {allowed}"
    if isinstance(error, web.HTTPRequestEntityTooLarge):
        return f"the request body is larger than the {service} accepts"
    if error.status >= 500:
        return "the server failed to handle this request"
    return error.reason

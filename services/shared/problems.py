"""The services' error hierarchy and its RFC 9457 ``application/problem+json`` rendering.

Code in the API and in gateway_auth raises a ``Problem`` subclass; in each service
its error middleware is the one place that turns it (or any other exception) into
a response. Each class
fixes the status, a stable ``type`` URI and a title; ``detail`` says what was
wrong with this request and how to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar, Final

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
# Not dereferenceable on purpose: RFC 9457 allows a URN as long as it is stable,
# and clients must match on it rather than on the title.
TYPE_PREFIX: Final = "urn:fleetplane:problem:"
WWW_AUTHENTICATE: Final = 'Bearer realm="fleetplane-operator"'
# A 422 lists at most this many errors so a hostile batch cannot inflate the answer.
MAX_LISTED_ERRORS: Final = 50


@dataclass(frozen=True, slots=True)
class FieldError:
    """One invalid input location, named JSON-path-like (``events[3].payload.health``)."""

    field: str
    message: str


class Problem(Exception):
    """Base of every error the API answers on purpose (never a 5xx with internals)."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        errors: tuple[FieldError, ...] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.headers: Mapping[str, str] = headers or {}

    @property
    def type_uri(self) -> str:
        return TYPE_PREFIX + self.slug


class MalformedRequest(Problem):
    status = 400
    slug = "malformed-request"
    title = "Malformed request"


class Unauthenticated(Problem):
    status = 401
    slug = "unauthenticated"
    title = "No verified client identity"


class OperatorUnauthenticated(Unauthenticated):
    """No usable operator key: missing, malformed, unknown, revoked or wrong secret.

    The detail never repeats the presented token.
    """

    slug = "invalid-operator-key"
    title = "No valid operator key"

    def __init__(self, detail: str) -> None:
        # RFC 9110: a 401 names the scheme that would succeed.
        super().__init__(detail, headers={"WWW-Authenticate": WWW_AUTHENTICATE})


class Forbidden(Problem):
    status = 403
    slug = "forbidden"
    title = "Forbidden"


class CertificateRevoked(Forbidden):
    """The client certificate was revoked (or its issuing CA retired) after the edge let it in."""

    slug = "certificate-refused"
    title = "Client certificate refused"


class NotFound(Problem):
    """The resource does not exist, or the caller may not know whether it exists."""

    status = 404
    slug = "not-found"
    title = "Not Found"


class PayloadTooLarge(Problem):
    status = 413
    slug = "payload-too-large"
    title = "Request body too large"


class UnsupportedMediaType(Problem):
    status = 415
    slug = "unsupported-media-type"
    title = "Unsupported media type"


class ValidationFailed(Problem):
    status = 422
    slug = "validation-failed"
    title = "Request failed validation"


class ServiceUnavailable(Problem):
    """A dependency is down: back-pressure, the client should retry the same request later."""

    status = 503
    slug = "service-unavailable"
    title = "Service temporarily unavailable"

    def __init__(self, detail: str, *, retry_after_s: int | None = None) -> None:
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else {}
        super().__init__(detail, headers=headers)
        self.retry_after_s = retry_after_s


def problem_body(problem: Problem, *, request_id: str | None = None) -> dict[str, Any]:
    """The JSON object for ``problem``; ``errors`` only when there are some."""
    return _body(
        problem.type_uri, problem.title, problem.status, problem.detail, problem.errors, request_id
    )


def http_problem_body(status: int, detail: str, *, request_id: str | None = None) -> dict[str, Any]:
    """The JSON object for a plain HTTP error (routing 404/405, aiohttp's own errors)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    slug = phrase.lower().replace(" ", "-").replace("'", "")
    return _body(TYPE_PREFIX + slug, phrase, status, detail, (), request_id)


def _body(
    type_uri: str,
    title: str,
    status: int,
    detail: str,
    errors: tuple[FieldError, ...],
    request_id: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": type_uri, "title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = [
            {"field": error.field, "message": error.message} for error in errors[:MAX_LISTED_ERRORS]
        ]
        if len(errors) > MAX_LISTED_ERRORS:
            body["errors_truncated"] = True
    if request_id is not None:
        body["request_id"] = request_id
    return body

"""Request and answer bodies of gateway_auth, as pydantic models (unknown fields refused)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, StringConstraints

from services.shared.identity import ID_PATTERN


def _iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


Timestamp = Annotated[datetime, PlainSerializer(_iso_utc, return_type=str, when_used="json")]
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Pem = Annotated[str, StringConstraints(min_length=1, max_length=16 * 1024)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenRequest(_Request):
    """``POST /v1/operator/customers/{c}/enrollment-tokens``."""

    environment_id: Id
    agent_id: Id | None = None
    """Bind the token to one agent name too; by default the CSR's CN names the agent."""
    ttl_s: int | None = Field(default=None, ge=30)
    """Lifetime in seconds (default: the service's token_ttl_s, at most token_ttl_max_s)."""


class TokenCreated(_Answer):
    token: str
    """Shown once: only its hash is stored."""
    token_id: str
    customer_id: str
    environment_id: str
    agent_id: str | None
    expires_at: Timestamp


class EnrollRequest(_Request):
    """``POST /v1/enroll`` on the enrollment listener."""

    token: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    csr: Pem
    """PKCS#10 in PEM; subject CN=<agent> (O/OU, if present, must match the token)."""


class RenewRequest(_Request):
    """``POST /v1/renew`` on the agent listener, with the current certificate."""

    csr: Pem


class CertificateIssued(_Answer):
    certificate_chain: str
    """PEM: the agent certificate, then its issuing CA; present both in the TLS handshake."""
    serial: str
    spiffe_id: str
    not_after: Timestamp
    renew_after: Timestamp
    """About two thirds into the lifetime: when the agent should renew."""


class RevocationRequest(_Request):
    """``POST /v1/operator/customers/{c}/revocations``."""

    environment_id: Id
    agent_id: Id | None = None
    """One agent; omit (or null) to revoke every agent of the environment."""
    reason: Annotated[str, StringConstraints(max_length=500)] | None = None


class RevocationRecorded(_Answer):
    revocation_id: int
    customer_id: str
    environment_id: str
    agent_id: str | None
    revoked_at: Timestamp
    certificates: int
    """Recorded, unexpired certificates of the scope it revoked."""


class AuditItem(_Answer):
    id: int
    at: Timestamp
    customer_id: str
    environment_id: str
    agent_id: str | None
    action: Literal[
        "token_created", "token_used", "certificate_issued", "certificate_renewed", "revoked"
    ]
    actor: str
    serial: str | None
    detail: dict[str, Any]
    request_id: str | None


class AuditList(_Answer):
    entries: list[AuditItem]

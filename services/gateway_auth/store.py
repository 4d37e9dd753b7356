"""gateway_auth's tables in PostgreSQL (SQLAlchemy Core on psycopg 3).

Every change that enforcement points must learn about (a revocation, a
certificate issued into a revoked scope, an issuing CA registered) NOTIFYs
``IDENTITY_CHANNEL`` in the same transaction, so a follower never sees the
notification before the change is visible.

Every change a restore must not forget is also appended to the identity journal
(services/shared/identity_journal.py) inside the transaction, before the commit:
when the append fails the change rolls back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.shared.identity import AgentIdentity
from services.shared.identity_journal import IdentityJournal, Kind
from services.shared.revocations import IDENTITY_CHANNEL

_NOTIFY: Final = text("SELECT pg_notify(:channel, :payload)")


def token_hash(token: str) -> bytes:
    """Enrollment tokens are 256 random bits: a fast hash is enough to store them."""
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class StoredToken:
    token_id: str
    customer_id: str
    environment_id: str
    agent_id: str | None
    expires_at: datetime
    used_at: datetime | None
    now: datetime
    """The database's clock when the token was read (the one that decides expiry)."""


@dataclass(frozen=True, slots=True)
class StoredOperatorKey:
    key_id: str
    customer_id: str | None
    secret_sha256: bytes


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    serial: str
    identity: AgentIdentity
    issuer_dn: str
    not_after: datetime
    via: str
    previous_serial: str | None = None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    identity_scope: tuple[str, str, str | None]
    """(customer, environment, agent or None)."""
    action: str
    actor: str
    serial: str | None = None
    detail: dict[str, Any] | None = None
    request_id: str | None = None


class IdentityStore:
    """All SQL of gateway_auth. Methods raise SQLAlchemy errors when the database is down."""

    def __init__(self, engine: AsyncEngine, journal: IdentityJournal | None = None) -> None:
        self.engine = engine
        self.journal = journal
        """None only where no restore will ever need the changes (unit tests)."""

    async def _journal(self, kind: Kind, key: str, row: dict[str, Any]) -> None:
        if self.journal is not None:
            await self.journal.append(kind, key, row)

    async def operator_key(self, key_id: str) -> StoredOperatorKey | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT key_id, customer_id, secret_sha256 FROM operator_keys "
                        "WHERE key_id = :key_id AND revoked_at IS NULL"
                    ),
                    {"key_id": key_id},
                )
            ).first()
        return None if row is None else StoredOperatorKey(row[0], row[1], bytes(row[2]))

    async def create_token(
        self,
        *,
        token: str,
        token_id: str,
        customer_id: str,
        environment_id: str,
        agent_id: str | None,
        ttl_s: int,
        created_by: str,
        request_id: str | None,
    ) -> datetime:
        """Store a token's hash and audit it; returns its expiry."""
        async with self.engine.begin() as conn:
            expires_at: datetime = (
                await conn.execute(
                    text(
                        "INSERT INTO enrollment_tokens (token_sha256, token_id, customer_id, "
                        "environment_id, agent_id, created_by, expires_at) VALUES (:hash, :id, "
                        ":c, :e, :a, :by, now() + make_interval(secs => :ttl)) "
                        "RETURNING expires_at"
                    ),
                    {
                        "hash": token_hash(token),
                        "id": token_id,
                        "c": customer_id,
                        "e": environment_id,
                        "a": agent_id,
                        "by": created_by,
                        "ttl": ttl_s,
                    },
                )
            ).scalar_one()
            await _audit(
                conn,
                AuditRecord(
                    (customer_id, environment_id, agent_id),
                    "token_created",
                    created_by,
                    detail={"token_id": token_id, "expires_at": expires_at.isoformat()},
                    request_id=request_id,
                ),
            )
        return expires_at

    async def find_token(self, token: str) -> StoredToken | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT token_id, customer_id, environment_id, agent_id, expires_at, "
                        "used_at, now() FROM enrollment_tokens WHERE token_sha256 = :hash"
                    ),
                    {"hash": token_hash(token)},
                )
            ).first()
        return None if row is None else StoredToken(*row)

    async def enroll(
        self, token: str, record: CertificateRecord, *, request_id: str | None
    ) -> tuple[str, datetime, bool] | None:
        """Consume the token and record the certificate, atomically.

        (token id, issued_at, whether a revocation covers the identity), or None
        when the token was used or expired meanwhile (nothing is recorded then).
        """
        async with self.engine.begin() as conn:
            used = (
                await conn.execute(
                    text(
                        "UPDATE enrollment_tokens SET used_at = now(), used_by_serial = :serial "
                        "WHERE token_sha256 = :hash AND used_at IS NULL AND expires_at > now() "
                        "RETURNING token_id, used_at"
                    ),
                    {"hash": token_hash(token), "serial": record.serial},
                )
            ).one_or_none()
            if used is None:
                return None
            token_id, used_at = used
            await self._journal(
                "token_used",
                token_hash(token).hex(),
                {
                    "token_sha256": token_hash(token),
                    "used_at": used_at,
                    "used_by_serial": record.serial,
                },
            )
            actor = f"enrollment-token:{token_id}"
            await _audit(
                conn,
                AuditRecord(
                    _scope(record.identity),
                    "token_used",
                    actor,
                    record.serial,
                    {"token_id": token_id},
                    request_id,
                ),
            )
            issued_at, covered = await self._record_certificate(conn, record, actor, request_id)
        return str(token_id), issued_at, covered

    async def renew(
        self, record: CertificateRecord, *, request_id: str | None
    ) -> tuple[datetime, bool]:
        """Record a renewed certificate: (issued_at, whether a revocation covers the identity)."""
        async with self.engine.begin() as conn:
            return await self._record_certificate(
                conn, record, f"agent:{record.previous_serial}", request_id
            )

    async def _record_certificate(
        self, conn: AsyncConnection, record: CertificateRecord, actor: str, request_id: str | None
    ) -> tuple[datetime, bool]:
        identity = record.identity
        issued_at: datetime = (
            await conn.execute(
                text(
                    "INSERT INTO agent_certificates (serial, customer_id, environment_id, "
                    "agent_id, issuer_dn, not_after, via, previous_serial) "
                    "VALUES (:serial, :c, :e, :a, :issuer, :not_after, :via, :previous) "
                    "RETURNING issued_at"
                ),
                {
                    "serial": record.serial,
                    "c": identity.customer_id,
                    "e": identity.environment_id,
                    "a": identity.agent_id,
                    "issuer": record.issuer_dn,
                    "not_after": record.not_after,
                    "via": record.via,
                    "previous": record.previous_serial,
                },
            )
        ).scalar_one()
        await self._journal(
            "certificate",
            record.serial,
            {
                "serial": record.serial,
                "customer_id": identity.customer_id,
                "environment_id": identity.environment_id,
                "agent_id": identity.agent_id,
                "issuer_dn": record.issuer_dn,
                "not_after": record.not_after,
                "issued_at": issued_at,
                "via": record.via,
                "previous_serial": record.previous_serial,
            },
        )
        await _audit(
            conn,
            AuditRecord(
                _scope(identity),
                "certificate_issued" if record.via == "enrollment" else "certificate_renewed",
                actor,
                record.serial,
                {
                    "issuer": record.issuer_dn,
                    "not_after": record.not_after.isoformat(),
                    **(
                        {"previous_serial": record.previous_serial}
                        if record.previous_serial
                        else {}
                    ),
                },
                request_id,
            ),
        )
        # A certificate issued after a revocation of its scope is valid, but only
        # once the followers know its issue time: tell them.
        covered = (
            await conn.execute(
                text(
                    "SELECT EXISTS (SELECT 1 FROM revocations WHERE customer_id = :c "
                    "AND environment_id = :e AND (agent_id IS NULL OR agent_id = :a))"
                ),
                {"c": identity.customer_id, "e": identity.environment_id, "a": identity.agent_id},
            )
        ).scalar_one()
        if covered:
            await conn.execute(_NOTIFY, {"channel": IDENTITY_CHANNEL, "payload": "certificate"})
        return issued_at, bool(covered)

    async def revoke(
        self,
        *,
        customer_id: str,
        environment_id: str,
        agent_id: str | None,
        revoked_by: str,
        reason: str | None,
        request_id: str | None,
    ) -> tuple[int, datetime, int]:
        """Record a revocation and NOTIFY; (id, revoked_at, recorded certificates it covers)."""
        async with self.engine.begin() as conn:
            revocation_id, revoked_at = (
                await conn.execute(
                    text(
                        "INSERT INTO revocations (customer_id, environment_id, agent_id, "
                        "revoked_by, reason) VALUES (:c, :e, :a, :by, :reason) "
                        "RETURNING id, revoked_at"
                    ),
                    {
                        "c": customer_id,
                        "e": environment_id,
                        "a": agent_id,
                        "by": revoked_by,
                        "reason": reason,
                    },
                )
            ).one()
            await self._journal(
                "revocation",
                f"{revocation_id}:{revoked_at.isoformat()}",
                {
                    "customer_id": customer_id,
                    "environment_id": environment_id,
                    "agent_id": agent_id,
                    "revoked_at": revoked_at,
                    "revoked_by": revoked_by,
                    "reason": reason,
                },
            )
            covered = (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM agent_certificates WHERE customer_id = :c "
                        "AND environment_id = :e AND (CAST(:a AS text) IS NULL OR agent_id = :a) "
                        "AND issued_at <= :at AND not_after > now()"
                    ),
                    {"c": customer_id, "e": environment_id, "a": agent_id, "at": revoked_at},
                )
            ).scalar_one()
            await _audit(
                conn,
                AuditRecord(
                    (customer_id, environment_id, agent_id),
                    "revoked",
                    revoked_by,
                    detail={
                        "revocation_id": revocation_id,
                        "certificates": covered,
                        **({"reason": reason} if reason else {}),
                    },
                    request_id=request_id,
                ),
            )
            await conn.execute(
                _NOTIFY, {"channel": IDENTITY_CHANNEL, "payload": f"revocation:{revocation_id}"}
            )
        return int(revocation_id), revoked_at, int(covered)

    async def register_issuer(self, subject_dn: str, certificate_pem: str) -> bool:
        """Trust an issuing CA (idempotent); True when it was new."""
        async with self.engine.begin() as conn:
            added = (
                await conn.execute(
                    text(
                        "INSERT INTO issuing_cas (subject_dn, certificate_pem) VALUES (:dn, :pem) "
                        "ON CONFLICT (subject_dn) DO NOTHING RETURNING subject_dn, added_at"
                    ),
                    {"dn": subject_dn, "pem": certificate_pem},
                )
            ).first()
            if added is not None:
                await self._journal(
                    "issuer",
                    subject_dn,
                    {
                        "subject_dn": subject_dn,
                        "certificate_pem": certificate_pem,
                        "added_at": added[1],
                    },
                )
                await conn.execute(_NOTIFY, {"channel": IDENTITY_CHANNEL, "payload": "issuer"})
        return added is not None

    async def audit(self, customer_id: str, *, limit: int) -> Sequence[dict[str, Any]]:
        """The customer's newest audit records first."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT id, at, customer_id, environment_id, agent_id, action, actor, "
                        "serial, detail, request_id FROM identity_audit "
                        "WHERE customer_id = :c ORDER BY at DESC, id DESC LIMIT :limit"
                    ),
                    {"c": customer_id, "limit": limit},
                )
            ).mappings()
            return [dict(row) for row in rows]


def _scope(identity: AgentIdentity) -> tuple[str, str, str | None]:
    return identity.customer_id, identity.environment_id, identity.agent_id


async def _audit(conn: AsyncConnection, record: AuditRecord) -> None:
    customer_id, environment_id, agent_id = record.identity_scope
    await conn.execute(
        text(
            "INSERT INTO identity_audit (customer_id, environment_id, agent_id, action, actor, "
            "serial, detail, request_id) VALUES (:c, :e, :a, :action, :actor, :serial, "
            "CAST(:detail AS jsonb), :request_id)"
        ),
        {
            "c": customer_id,
            "e": environment_id,
            "a": agent_id,
            "action": record.action,
            "actor": record.actor,
            "serial": record.serial,
            "detail": json.dumps(record.detail or {}),
            "request_id": record.request_id,
        },
    )

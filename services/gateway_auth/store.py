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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, func, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.shared.channels import IDENTITY_CHANNEL
from services.shared.identity import AgentIdentity
from services.shared.identity_journal import IdentityJournal, Kind
from services.shared.operator_auth import StoredOperatorKey
from services.shared.schema import (
    agent_certificates,
    enrollment_tokens,
    identity_audit,
    issuing_cas,
    operator_keys,
    revocations,
)


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
class NewToken:
    """What an operator asked an enrollment token for."""

    scope: tuple[str, str, str | None]
    """(customer, environment, agent or None: any agent id)."""
    ttl_s: int
    created_by: str


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


class IdentityStore:
    """All SQL of the running gateway_auth service (its CLIs, ``operator_keys`` and
    ``issuers``, run their own). Methods raise SQLAlchemy errors when the database is down.
    """

    def __init__(self, engine: AsyncEngine, journal: IdentityJournal | None = None) -> None:
        self.engine = engine
        self.journal = journal
        """None only where no restore will ever need the changes (unit tests)."""

    async def _journal(self, kind: Kind, key: str, row: dict[str, Any]) -> None:
        if self.journal is not None:
            await self.journal.append(kind, key, row)

    async def operator_key(self, key_id: str) -> StoredOperatorKey | None:
        k = operator_keys.c
        query = select(k.key_id, k.customer_id, k.secret_sha256).where(
            k.key_id == key_id, k.revoked_at.is_(None)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else StoredOperatorKey(row[0], bytes(row[2]), row[1])

    async def create_token(
        self, token: str, token_id: str, new: NewToken, *, request_id: str | None
    ) -> datetime:
        """Store a token's hash and audit it; returns its expiry."""
        customer_id, environment_id, agent_id = new.scope
        statement = (
            insert(enrollment_tokens)
            .values(
                token_sha256=token_hash(token),
                token_id=token_id,
                customer_id=customer_id,
                environment_id=environment_id,
                agent_id=agent_id,
                created_by=new.created_by,
                # The database's clock decides expiry (find_token reads it too).
                expires_at=func.now() + timedelta(seconds=new.ttl_s),
            )
            .returning(enrollment_tokens.c.expires_at)
        )
        async with self.engine.begin() as conn:
            expires_at: datetime = (await conn.execute(statement)).scalar_one()
            detail = {"token_id": token_id, "expires_at": expires_at.isoformat()}
            created = AuditRecord(new.scope, "token_created", new.created_by, None, detail)
            await _audit(conn, created, request_id)
        return expires_at

    async def find_token(self, token: str) -> StoredToken | None:
        t = enrollment_tokens.c
        query = select(
            t.token_id, t.customer_id, t.environment_id, t.agent_id, t.expires_at, t.used_at
        ).add_columns(func.now())
        async with self.engine.connect() as conn:
            row = (await conn.execute(query.where(t.token_sha256 == token_hash(token)))).first()
        return None if row is None else StoredToken(*row)

    async def enroll(
        self, token: str, record: CertificateRecord, *, request_id: str | None
    ) -> tuple[str, datetime, bool] | None:
        """Consume the token and record the certificate, atomically.

        (token id, issued_at, whether a revocation covers the identity), or None
        when the token was used or expired meanwhile (nothing is recorded then).
        """
        t = enrollment_tokens.c
        consume = (
            enrollment_tokens.update()
            .where(t.token_sha256 == token_hash(token), t.used_at.is_(None))
            .where(t.expires_at > func.now())
            .values(used_at=func.now(), used_by_serial=record.serial)
            .returning(t.token_id, t.used_at)
        )
        async with self.engine.begin() as conn:
            used = (await conn.execute(consume)).one_or_none()
            if used is None:
                return None
            token_id, used_at = used
            journaled = {"used_at": used_at, "used_by_serial": record.serial}
            await self._journal(
                "token_used",
                token_hash(token).hex(),
                {"token_sha256": token_hash(token)} | journaled,
            )
            actor = f"enrollment-token:{token_id}"
            detail = {"token_id": token_id}
            audited = AuditRecord(
                _scope(record.identity), "token_used", actor, record.serial, detail
            )
            await _audit(conn, audited, request_id)
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
        row = {
            "serial": record.serial,
            "customer_id": identity.customer_id,
            "environment_id": identity.environment_id,
            "agent_id": identity.agent_id,
            "issuer_dn": record.issuer_dn,
            "not_after": record.not_after,
            "via": record.via,
            "previous_serial": record.previous_serial,
        }
        statement = agent_certificates.insert().values(row)
        issued_at: datetime = (
            await conn.execute(statement.returning(agent_certificates.c.issued_at))
        ).scalar_one()
        await self._journal("certificate", record.serial, row | {"issued_at": issued_at})
        detail = {"issuer": record.issuer_dn, "not_after": record.not_after.isoformat()}
        if record.previous_serial:
            detail["previous_serial"] = record.previous_serial
        action = "certificate_issued" if record.via == "enrollment" else "certificate_renewed"
        issued = AuditRecord(_scope(identity), action, actor, record.serial, detail)
        await _audit(conn, issued, request_id)
        # A certificate issued after a revocation of its scope is valid, but only
        # once the followers know its issue time: tell them.
        r = revocations.c
        covering = exists().where(
            r.customer_id == identity.customer_id,
            r.environment_id == identity.environment_id,
            or_(r.agent_id.is_(None), r.agent_id == identity.agent_id),
        )
        covered = bool((await conn.execute(select(covering))).scalar_one())
        if covered:
            await _notify(conn, "certificate")
        return issued_at, covered

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
        row = {
            "customer_id": customer_id,
            "environment_id": environment_id,
            "agent_id": agent_id,
            "revoked_by": revoked_by,
            "reason": reason,
        }
        r = revocations.c
        statement = revocations.insert().values(row).returning(r.id, r.revoked_at)
        async with self.engine.begin() as conn:
            revocation_id, revoked_at = (await conn.execute(statement)).one()
            await self._journal(
                "revocation",
                f"{revocation_id}:{revoked_at.isoformat()}",
                row | {"revoked_at": revoked_at},
            )
            c = agent_certificates.c
            counted = select(func.count()).where(
                c.customer_id == customer_id,
                c.environment_id == environment_id,
                c.issued_at <= revoked_at,
                c.not_after > func.now(),
            )
            if agent_id is not None:
                counted = counted.where(c.agent_id == agent_id)
            covered = (await conn.execute(counted)).scalar_one()
            detail: dict[str, Any] = {"revocation_id": revocation_id, "certificates": covered}
            if reason:
                detail["reason"] = reason
            scope = (customer_id, environment_id, agent_id)
            await _audit(conn, AuditRecord(scope, "revoked", revoked_by, None, detail), request_id)
            await _notify(conn, f"revocation:{revocation_id}")
        return int(revocation_id), revoked_at, int(covered)

    async def register_issuer(self, subject_dn: str, certificate_pem: str) -> bool:
        """Trust an issuing CA (idempotent); True when it was new."""
        i = issuing_cas.c
        statement = (
            insert(issuing_cas)
            .values(subject_dn=subject_dn, certificate_pem=certificate_pem)
            .on_conflict_do_nothing(index_elements=[i.subject_dn])
            .returning(i.added_at)
        )
        async with self.engine.begin() as conn:
            added_at = (await conn.execute(statement)).scalar_one_or_none()
            if added_at is not None:
                entry = {
                    "subject_dn": subject_dn,
                    "certificate_pem": certificate_pem,
                    "added_at": added_at,
                }
                await self._journal("issuer", subject_dn, entry)
                await _notify(conn, "issuer")
        return added_at is not None

    async def audit(self, customer_id: str, *, limit: int) -> Sequence[dict[str, Any]]:
        """The customer's newest audit records first."""
        a = identity_audit.c
        query = (
            select(identity_audit)
            .where(a.customer_id == customer_id)
            .order_by(a.at.desc(), a.id.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [dict(row) for row in (await conn.execute(query)).mappings()]


def _scope(identity: AgentIdentity) -> tuple[str, str, str | None]:
    return identity.customer_id, identity.environment_id, identity.agent_id


async def _notify(conn: AsyncConnection, payload: str) -> None:
    """NOTIFY the identity channel, delivered when (and only if) the transaction commits."""
    await conn.execute(select(func.pg_notify(IDENTITY_CHANNEL, payload)))


async def _audit(conn: AsyncConnection, record: AuditRecord, request_id: str | None) -> None:
    customer_id, environment_id, agent_id = record.identity_scope
    await conn.execute(
        identity_audit.insert().values(
            customer_id=customer_id,
            environment_id=environment_id,
            agent_id=agent_id,
            action=record.action,
            actor=record.actor,
            serial=record.serial,
            detail=record.detail or {},
            request_id=request_id,
        )
    )

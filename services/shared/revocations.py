"""Which agent certificates are no longer accepted: revocations and retired issuing CAs.

gateway_auth writes the ``revocations`` and ``issuing_cas`` tables and NOTIFYs
``IDENTITY_CHANNEL`` in the same transaction; every process that enforces them
(gateway_auth's edge check, the API's open long polls) keeps a ``TrustState`` in
memory, reloads it on each notification and on a timer as a safety net.

Rule: a revocation names an environment, or one agent in it, and an instant;
every certificate of that scope issued up to the instant is refused. A
certificate issued later (the operator let the agent enroll again) is not. A
certificate gateway_auth has no record of (one made offline with the PKI CLI)
is refused as soon as any revocation covers its identity. An issuing CA is
trusted when it is registered and its ``retire_at`` is unset or still ahead.

Plain data and one loader; no aiohttp.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import psycopg
from sqlalchemy import Select, exists, or_, select
from sqlalchemy.dialects.postgresql.base import PGDialect

from services.shared.channels import IDENTITY_CHANNEL as IDENTITY_CHANNEL
from services.shared.identity import AgentIdentity
from services.shared.schema import agent_certificates, issuing_cas, revocations

REVOKED: Final = "the client certificate was revoked"
UNKNOWN_ISSUER: Final = "the client certificate's issuing CA is not trusted"
RETIRED_ISSUER: Final = "the client certificate's issuing CA was retired"


def normal_serial(serial: str | int) -> str:
    """A serial number as stored: lower-case hex without leading zeros.

    nginx's ``$ssl_client_serial`` is upper-case hex, padded to whole bytes.
    Raises ValueError for anything that is not hex.
    """
    number = serial if isinstance(serial, int) else int(serial, 16)
    if number < 0:
        raise ValueError("a serial number is not negative")
    return format(number, "x")


@dataclass(frozen=True, slots=True)
class Revocation:
    customer_id: str
    environment_id: str
    agent_id: str | None
    """None: the whole environment."""
    revoked_at: datetime

    def covers(self, identity: AgentIdentity) -> bool:
        return (
            self.customer_id == identity.customer_id
            and self.environment_id == identity.environment_id
            and (self.agent_id is None or self.agent_id == identity.agent_id)
        )


@dataclass(frozen=True, slots=True)
class TrustState:
    """A snapshot of revocations and issuing CAs; build with ``load_trust_state``."""

    revocations: Mapping[tuple[str, str], Sequence[Revocation]] = field(default_factory=dict)
    """By (customer, environment)."""
    issued_at: Mapping[str, datetime] = field(default_factory=dict)
    """Issue time of every recorded certificate that some revocation's scope covers."""
    issuers: Mapping[str, datetime | None] = field(default_factory=dict)
    """Registered issuing CA subject DN -> retire_at (None: no end)."""

    def revocation_for(self, identity: AgentIdentity, serial: str) -> Revocation | None:
        """The earliest revocation that covers this certificate, or None."""
        scope = self.revocations.get((identity.customer_id, identity.environment_id), ())
        issued = self.issued_at.get(serial)
        for revocation in scope:  # ordered by revoked_at
            if revocation.covers(identity) and (issued is None or issued <= revocation.revoked_at):
                return revocation
        return None

    def issuer_refusal(self, issuer_dn: str, now: datetime) -> str | None:
        if issuer_dn not in self.issuers:
            return UNKNOWN_ISSUER
        retire_at = self.issuers[issuer_dn]
        if retire_at is not None and retire_at <= now:
            return RETIRED_ISSUER
        return None

    def refusal(
        self, identity: AgentIdentity, serial: str, issuer_dn: str | None, now: datetime
    ) -> tuple[str, Revocation | None] | None:
        """Why this certificate is refused (and the revocation, if that is why), or None.

        ``serial`` must be normalised (``normal_serial``); ``issuer_dn`` None skips
        the issuer check (the API, which sees no issuer).
        """
        revocation = self.revocation_for(identity, serial)
        if revocation is not None:
            return REVOKED, revocation
        if issuer_dn is not None:
            reason = self.issuer_refusal(issuer_dn, now)
            if reason is not None:
                return reason, None
        return None


def _sql(statement: Select[Any]) -> str:
    """A Core statement as SQL text for a plain psycopg connection.

    The callers load the state on the connection that LISTENs to
    ``IDENTITY_CHANNEL`` (SQLAlchemy has no LISTEN, and a pooled connection
    cannot hold one), so the statements are written in Core against the shared
    tables and compiled once; none takes a parameter.
    """
    # SQLAlchemy leaves the dialect constructors unannotated.
    return str(statement.compile(dialect=PGDialect()))  # type: ignore[no-untyped-call]


_r, _c = revocations.c, agent_certificates.c
_REVOCATIONS_SQL: Final = _sql(
    select(_r.customer_id, _r.environment_id, _r.agent_id, _r.revoked_at).order_by(_r.revoked_at)
)
_COVERED_CERTIFICATES_SQL: Final = _sql(
    select(_c.serial, _c.issued_at).where(
        exists().where(
            _r.customer_id == _c.customer_id,
            _r.environment_id == _c.environment_id,
            or_(_r.agent_id.is_(None), _r.agent_id == _c.agent_id),
        )
    )
)
_ISSUERS_SQL: Final = _sql(select(issuing_cas.c.subject_dn, issuing_cas.c.retire_at))


async def load_trust_state(connection: psycopg.AsyncConnection[Any]) -> TrustState:
    """Read the whole state in one snapshot (REPEATABLE READ); raises psycopg errors."""
    revocations: dict[tuple[str, str], list[Revocation]] = {}
    async with connection.transaction():
        await connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        for customer_id, environment_id, agent_id, revoked_at in await (
            await connection.execute(_REVOCATIONS_SQL)
        ).fetchall():
            revocations.setdefault((customer_id, environment_id), []).append(
                Revocation(customer_id, environment_id, agent_id, revoked_at)
            )
        issued = {
            serial: at
            for serial, at in await (await connection.execute(_COVERED_CERTIFICATES_SQL)).fetchall()
        }
        issuers = {
            dn: retire_at
            for dn, retire_at in await (await connection.execute(_ISSUERS_SQL)).fetchall()
        }
    return TrustState(revocations, issued, issuers)

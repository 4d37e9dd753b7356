"""Agent identity lifecycle: enrollment, renewal, revocation. No aiohttp.

Handlers parse HTTP and call these; everything that decides lives here.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.gateway_auth.ca import CertificateAuthority
from services.gateway_auth.csr import CsrRefused, check_csr
from services.gateway_auth.problems import (
    CertificateRefused,
    EnrollmentTokenExpired,
    EnrollmentTokenUsed,
    InvalidEnrollmentToken,
    csr_problem,
)
from services.gateway_auth.store import CertificateRecord, IdentityStore, NewToken, StoredToken
from services.shared import metrics as specs
from services.shared.certificate_check import CertificateCheck
from services.shared.edge_auth import AgentCertificate
from services.shared.identity import AgentIdentity
from services.shared.revocations import normal_serial

log = logging.getLogger(__name__)

TOKEN_PREFIX: Final = "fpe_"  # noqa: S105  # a prefix, not a secret


@dataclass(frozen=True, slots=True)
class GatewayMetrics:
    registry: CollectorRegistry
    requests: Counter
    issued: Counter
    refusals: Counter
    certificate_checks: Counter
    revocation_delay: Histogram
    certificate_expiry: Gauge
    request_duration: Histogram
    database_pool: Gauge

    @classmethod
    def create(cls) -> GatewayMetrics:
        registry = CollectorRegistry(auto_describe=True)
        return cls(
            registry=registry,
            requests=specs.counter(registry, specs.GATEWAY_AUTH_REQUESTS),
            issued=specs.counter(registry, specs.GATEWAY_AUTH_CERTIFICATES_ISSUED),
            refusals=specs.counter(registry, specs.GATEWAY_AUTH_REFUSALS),
            certificate_checks=specs.counter(registry, specs.CERTIFICATE_CHECKS),
            revocation_delay=specs.histogram(registry, specs.IDENTITY_REVOCATION_DELAY),
            certificate_expiry=specs.gauge(registry, specs.CERTIFICATE_EXPIRY),
            request_duration=specs.histogram(registry, specs.GATEWAY_AUTH_REQUEST_DURATION),
            database_pool=specs.gauge(registry, specs.DATABASE_POOL_CONNECTIONS),
        )


@dataclass(frozen=True, slots=True)
class IssuedAgentCertificate:
    certificate: x509.Certificate
    chain_pem: str
    """The certificate followed by its issuing CA: what the agent presents."""

    @property
    def serial(self) -> str:
        return normal_serial(self.certificate.serial_number)

    @property
    def spiffe_id(self) -> str:
        """The one URI SAN the policy puts in."""
        names = self.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return str(names.value.get_values_for_type(x509.UniformResourceIdentifier)[0])


class IssuingCa:
    """The issuing CA from its files, re-read when they change (rotation needs no restart)."""

    def __init__(self, cert_path: Path, key_path: Path) -> None:
        self._cert_path = cert_path
        self._key_path = key_path
        self._stamp: tuple[float, float] | None = None
        self._ca: CertificateAuthority | None = None

    def current(self) -> tuple[CertificateAuthority, bool]:
        """(the CA, whether it changed since the last call). Raises OSError/ValueError."""
        stamp = (os.stat(self._cert_path).st_mtime, os.stat(self._key_path).st_mtime)
        if self._ca is not None and stamp == self._stamp:
            return self._ca, False
        self._ca = CertificateAuthority.load(self._cert_path, self._key_path)
        self._stamp = stamp
        return self._ca, True


@dataclass
class IdentityService:
    store: IdentityStore
    issuing: IssuingCa
    trust: CertificateCheck
    metrics: GatewayMetrics
    agent_validity: timedelta
    _registered: set[str] = field(default_factory=set)

    async def _issuing_ca(self) -> CertificateAuthority:
        ca, _ = self.issuing.current()
        dn = ca.certificate.subject.rfc4514_string()
        if dn not in self._registered:
            if await self.store.register_issuer(dn, ca.certificate_pem.decode()):
                log.info("registered issuing CA %s", dn)
                self.trust.note_issuer(dn)
            self._registered.add(dn)
        return ca

    async def register_issuer(self) -> None:
        """Make sure the current issuing CA is trusted at the edge (on start, and on change)."""
        await self._issuing_ca()

    async def create_token(
        self, new: NewToken, *, request_id: str | None
    ) -> tuple[str, str, datetime]:
        """(token, token id, expires_at); the token is shown once and only its hash is kept."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = secrets.token_hex(8)
        expires_at = await self.store.create_token(token, token_id, new, request_id=request_id)
        return token, token_id, expires_at

    def _refuse(self, problem: Exception, reason: str) -> Exception:
        self.metrics.refusals.labels(reason=reason).inc()
        return problem

    async def _usable_token(self, token: str) -> StoredToken:
        found = await self.store.find_token(token) if token.startswith(TOKEN_PREFIX) else None
        if found is None:
            raise self._refuse(
                InvalidEnrollmentToken(
                    "the enrollment token is unknown; ask an operator for a new one"
                ),
                "invalid-enrollment-token",
            )
        if found.used_at is not None:
            raise self._refuse(
                EnrollmentTokenUsed(
                    "this enrollment token was already used; a token enrolls one agent once"
                ),
                "enrollment-token-used",
            )
        if found.expires_at <= found.now:
            raise self._refuse(
                EnrollmentTokenExpired(
                    "this enrollment token expired; ask an operator for a new one"
                ),
                "enrollment-token-expired",
            )
        return found

    def _checked(self, csr_pem: str, customer: str, environment: str, agent: str | None) -> Any:
        try:
            return check_csr(
                csr_pem, customer_id=customer, environment_id=environment, agent_id=agent
            )
        except CsrRefused as refused:
            raise self._refuse(csr_problem(refused), refused.kind) from None

    async def _sign(self, identity: AgentIdentity, public_key: Any) -> IssuedAgentCertificate:
        ca = await self._issuing_ca()
        certificate = ca.sign_agent_key(identity, public_key, valid_for=self.agent_validity)
        pem = certificate.public_bytes(serialization.Encoding.PEM) + ca.certificate_pem
        return IssuedAgentCertificate(certificate, pem.decode())

    async def enroll(
        self, token: str, csr_pem: str, *, request_id: str | None
    ) -> IssuedAgentCertificate:
        """A certificate for the CSR's key, if the token is usable and the CSR fits it."""
        found = await self._usable_token(token)
        checked = self._checked(csr_pem, found.customer_id, found.environment_id, found.agent_id)
        issued = await self._sign(checked.identity, checked.public_key)
        recorded = await self.store.enroll(
            token, self._record(issued, checked.identity, "enrollment"), request_id=request_id
        )
        if recorded is None:
            # Used or expired between the lookup and now: say which.
            await self._usable_token(token)
            raise self._refuse(
                EnrollmentTokenUsed("this enrollment token was already used"),
                "enrollment-token-used",
            )
        token_id, issued_at, covered = recorded
        if covered:
            self.trust.note_issued(issued.serial, issued_at)
        self.metrics.issued.labels(via="enrollment").inc()
        log.info(
            "enrolled %s (token %s, serial %s)",
            checked.identity.spiffe_uri,
            token_id,
            issued.serial,
        )
        return issued

    async def renew(
        self, current: AgentCertificate, csr_pem: str, *, request_id: str | None
    ) -> IssuedAgentCertificate:
        """A new certificate with the same identity, for the holder of a current one."""
        reason = self.trust.check(current)
        if reason is not None:
            raise self._refuse(CertificateRefused(f"{reason}; renewal refused"), "revoked")
        identity = current.identity
        checked = self._checked(
            csr_pem, identity.customer_id, identity.environment_id, identity.agent_id
        )
        issued = await self._sign(identity, checked.public_key)
        assert current.serial is not None  # trust.check refuses a missing serial
        issued_at, covered = await self.store.renew(
            self._record(issued, identity, "renewal", normal_serial(current.serial)),
            request_id=request_id,
        )
        if covered:
            self.trust.note_issued(issued.serial, issued_at)
        self.metrics.issued.labels(via="renewal").inc()
        return issued

    @staticmethod
    def _record(
        issued: IssuedAgentCertificate,
        identity: AgentIdentity,
        via: str,
        previous: str | None = None,
    ) -> CertificateRecord:
        certificate = issued.certificate
        return CertificateRecord(
            serial=issued.serial,
            identity=identity,
            issuer_dn=certificate.issuer.rfc4514_string(),
            not_after=certificate.not_valid_after_utc,
            via=via,
            previous_serial=previous,
        )

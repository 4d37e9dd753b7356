"""The per-request agent certificate check, made by the process that serves the request.

nginx verifies the chain (agent -> issuing CA -> root) and the validity dates
on every connection; what it cannot know is kept here, in memory, and checked
on every request, on new, kept-alive and resumed connections alike:

- a revocation of the agent or its environment (``services.shared.revocations``);
- the issuing CA retired, or not registered at all;
- names that mean different things to different readers
  (``services.shared.certificate_names``: exactly one URI SAN, the SPIFFE URI of
  the identity the subject DN names).

The API checks every agent request this way, and gateway_auth its renewals:
both follow the same trust state (reloaded on the identity NOTIFY within
milliseconds of a change, and on a timer), so there is no second hop per
request and no cached verdict that outlives a revocation. docs/threat-model.md
("Where the per-request check runs") gives the security argument.

Plain logic and two metrics; no aiohttp, no database driver.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final, Protocol

from prometheus_client import Counter, Histogram

from services.shared.certificate_names import NameCheck
from services.shared.edge_auth import AgentCertificate
from services.shared.problems import ServiceUnavailable, Unauthenticated
from services.shared.revocations import REVOKED, UNKNOWN_ISSUER, TrustState, normal_serial

log = logging.getLogger(__name__)

MAX_OBSERVED: Final = 100_000
"""Bounds the set of certificates whose first refusal was measured."""


@dataclass(frozen=True, slots=True)
class IssuerRecord:
    """A registered issuing CA, as the database has it."""

    subject_dn: str
    retire_at: datetime | None


class TrustRecords(Protocol):
    """The records a loaded trust state may be too young to know (the database)."""

    async def issuer(self, subject_dn: str) -> IssuerRecord | None:
        """The registered issuing CA with this subject DN, or None."""
        ...

    async def certificate_issued_at(self, serial: str) -> datetime | None:
        """When the certificate with this serial (normalised) was issued, or None."""
        ...


class CertificateCheck:
    """The trust state as last loaded, and the check every agent request passes.

    ``checks`` counts checks by outcome (allowed, refused); ``revocation_delay``
    observes, once per certificate and process, how long after its revocation a
    certificate was first refused. Either may be None (unit tests).
    """

    def __init__(
        self,
        checks: Counter | None = None,
        revocation_delay: Histogram | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._state: TrustState | None = None
        self._not_recorded: set[str] = set()
        self._clock = clock
        self._observed: set[str] = set()
        self._names = NameCheck()
        self._delay = revocation_delay
        self._allowed = checks.labels(outcome="allowed") if checks is not None else None
        self._refused = checks.labels(outcome="refused") if checks is not None else None

    @property
    def state(self) -> TrustState | None:
        return self._state

    @state.setter
    def state(self, state: TrustState | None) -> None:
        self._state = state
        # A reloaded state knows every recorded certificate its revocations cover.
        self._not_recorded.clear()

    async def check_against(
        self, certificate: AgentCertificate, records: TrustRecords
    ) -> str | None:
        """``check``, asking ``records`` before a refusal the state may be too young for.

        An issuing CA registered since the state was loaded (a rotation), and a
        certificate issued into a revoked scope since (the operator let the agent
        enroll again), are refused by a state whose NOTIFY is still on the way:
        the records decide before either refusal, once per loaded state. Errors of
        ``records`` propagate.
        """
        reason = self.check(certificate)
        if reason == UNKNOWN_ISSUER and certificate.issuer_dn is not None:
            issuer = await records.issuer(certificate.issuer_dn)
            if issuer is not None:
                self.note_issuer(issuer.subject_dn, issuer.retire_at)
                reason = self.check(certificate)
        if reason == REVOKED:
            serial = self._unrecorded_serial(certificate)
            if serial is not None:
                self._note_lookup(serial, await records.certificate_issued_at(serial))
                reason = self.check(certificate)
        return reason

    def _unrecorded_serial(self, certificate: AgentCertificate) -> str | None:
        """The certificate's serial when a revocation refuses it only for want of a record.

        A revocation refuses a certificate the state has no issue time for (one
        made offline) by its identity alone; one issued since the state was
        loaded (the operator let the agent enroll again) is not in it yet either.
        Such a serial is worth one lookup per loaded state; None otherwise.
        """
        state = self._state
        serial = _normal(certificate.serial)
        if (
            state is None
            or not serial
            or serial in state.issued_at
            or serial in self._not_recorded
            or state.revocation_for(certificate.identity, serial) is None
        ):
            return None
        return serial

    def _note_lookup(self, serial: str, issued_at: datetime | None) -> None:
        """What the records said of an unrecorded serial: issued then, or never recorded."""
        if issued_at is None:
            if len(self._not_recorded) >= MAX_OBSERVED:
                self._not_recorded.clear()
            self._not_recorded.add(serial)
        else:
            self.note_issued(serial, issued_at)

    def note_issued(self, serial: str, issued_at: datetime) -> None:
        """A certificate this process just issued into a revoked scope is valid at once here
        (other processes learn it from the NOTIFY)."""
        if self._state is not None:
            self._state = replace(
                self._state, issued_at={**self._state.issued_at, serial: issued_at}
            )

    def note_issuer(self, issuer_dn: str, retire_at: datetime | None = None) -> None:
        """An issuing CA registered since the state was loaded is trusted at once here.

        gateway_auth calls it when it registers one; the API when the database
        says a CA it did not know is registered (the NOTIFY may not have arrived).
        """
        if self._state is not None and issuer_dn not in self._state.issuers:
            self._state = replace(
                self._state, issuers={**self._state.issuers, issuer_dn: retire_at}
            )

    def check(self, certificate: AgentCertificate) -> str | None:
        """None when the request may be served; else why it is refused.

        Refused: a revoked certificate, one of a retired or unknown issuing CA,
        and one whose names are ambiguous (or not forwarded: the names rule
        needs the certificate itself). Raises Unauthenticated when the edge
        forwarded no serial or issuer (a configuration error at the edge:
        refusing is the safe answer); ServiceUnavailable while the state is not
        loaded yet (readiness says so too).
        """
        if certificate.serial is None or certificate.issuer_dn is None:
            raise Unauthenticated("the edge forwarded no certificate serial and issuer")
        try:
            serial = normal_serial(certificate.serial)
        except ValueError as e:
            raise Unauthenticated("the edge forwarded a malformed certificate serial") from e
        state = self.state
        if state is None:
            raise ServiceUnavailable("the revocation state is not loaded yet", retry_after_s=1)
        now = self._clock()
        refused = state.refusal(certificate.identity, serial, certificate.issuer_dn, now)
        if refused is None:
            ambiguous = self._names.refusal(
                certificate.escaped_pem, certificate.identity, certificate.serial
            )
            self._count(ambiguous is None)
            return ambiguous
        reason, revocation = refused
        self._count(False)
        if revocation is not None:
            self._observe(serial, certificate, (now - revocation.revoked_at).total_seconds())
        return reason

    def revoked_at(self, certificate: AgentCertificate) -> datetime | None:
        """When a revocation covering this certificate took effect, or None (also unloaded)."""
        if self.state is None:
            return None
        revocation = self.state.revocation_for(certificate.identity, _normal(certificate.serial))
        return None if revocation is None else revocation.revoked_at

    def observe_longpoll_refusal(self, certificate: AgentCertificate) -> None:
        """Record how long after its revocation a waiting long poll was ended."""
        revoked_at = self.revoked_at(certificate)
        if revoked_at is None:
            return
        delay = (self._clock() - revoked_at).total_seconds()
        if self._delay is not None:
            self._delay.labels(where="longpoll").observe(max(delay, 0.0))
        log.info(
            "ended the long poll of revoked %s %.3f s after revocation",
            certificate.identity,
            delay,
        )

    def _count(self, allowed: bool) -> None:
        counter = self._allowed if allowed else self._refused
        if counter is not None:
            counter.inc()

    def _observe(self, serial: str, certificate: AgentCertificate, delay: float) -> None:
        if serial in self._observed:
            return
        if len(self._observed) >= MAX_OBSERVED:
            self._observed.clear()
        self._observed.add(serial)
        if self._delay is not None:
            self._delay.labels(where="request").observe(max(delay, 0.0))
        log.info(
            "first refusal of revoked certificate %s (%s) %.3f s after its revocation",
            serial,
            certificate.identity.spiffe_uri,
            delay,
        )


def _normal(serial: str | None) -> str:
    # Without a serial (a misconfigured edge) only the identity rule can match.
    if serial is None:
        return ""
    try:
        return normal_serial(serial)
    except ValueError:
        return ""

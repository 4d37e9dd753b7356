"""The per-request name check: exactly one SPIFFE URI SAN, naming the subject's identity."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from services.gateway_auth.ca import CertificateAuthority, agent_subject
from services.gateway_auth.service import GatewayMetrics
from services.shared import certificate_names as names
from services.shared.certificate_check import CertificateCheck
from services.shared.edge_auth import AgentCertificate
from services.shared.identity import AgentIdentity
from services.shared.revocations import UNKNOWN_ISSUER, TrustState

ACME = AgentIdentity("acme", "prod", "agent-1")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    root = CertificateAuthority.create_root("test root", path_length=1)
    return root.create_intermediate("test issuing", permitted_uri_hosts=["fleetplane"])


def certificate(
    ca: CertificateAuthority, identity: AgentIdentity, sans: list[x509.GeneralName]
) -> x509.Certificate:
    issued = ca.issue(
        agent_subject(identity),
        names=sans,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        valid_for=timedelta(hours=1),
    )
    return x509.load_pem_x509_certificate(issued.certificate_pem)


def uri(identity: AgentIdentity) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(identity.spiffe_uri)


def serial_of(cert: x509.Certificate) -> str:
    # nginx's form: upper-case hex.
    return format(cert.serial_number, "X")


def escaped(cert: x509.Certificate) -> str:
    return quote(cert.public_bytes(Encoding.PEM).decode(), safe="")


def test_the_policys_certificate_passes(ca: CertificateAuthority) -> None:
    cert = certificate(ca, ACME, [uri(ACME)])
    assert names.name_refusal(cert, ACME, serial_of(cert)) is None
    assert names.escaped_certificate_refusal(escaped(cert), ACME, serial_of(cert)) is None


@pytest.mark.parametrize(
    ("sans", "reason"),
    [
        ([uri(AgentIdentity("other", "prod", "agent-1"))], names.MISMATCH),
        ([uri(AgentIdentity("acme", "staging", "agent-1"))], names.MISMATCH),
        ([uri(AgentIdentity("acme", "prod", "agent-2"))], names.MISMATCH),
        ([x509.UniformResourceIdentifier("spiffe://fleetplane/customer/acme")], names.MISMATCH),
        ([uri(ACME), uri(ACME)], names.NOT_ONE_NAME),
        ([uri(ACME), uri(AgentIdentity("other", "prod", "agent-1"))], names.NOT_ONE_NAME),
        ([uri(ACME), x509.DNSName("agent-1.example")], names.NOT_ONE_NAME),
        ([x509.DNSName("agent-1.example")], names.NO_URI_SAN),
        ([], names.NO_URI_SAN),
    ],
    ids=[
        "other-customer",
        "other-environment",
        "other-agent",
        "partial-uri",
        "same-uri-twice",
        "two-uris",
        "uri-and-dns",
        "dns-only",
        "no-san",
    ],
)
def test_ambiguous_names_are_refused(
    ca: CertificateAuthority, sans: list[x509.GeneralName], reason: str
) -> None:
    cert = certificate(ca, ACME, sans)
    assert names.name_refusal(cert, ACME, serial_of(cert)) == reason


def test_a_certificate_other_than_the_forwarded_identity_and_serial_is_refused(
    ca: CertificateAuthority,
) -> None:
    cert = certificate(ca, ACME, [uri(ACME)])
    other = AgentIdentity("acme", "prod", "agent-2")
    assert names.name_refusal(cert, other, serial_of(cert)) == names.NOT_FORWARDED_ONE
    assert names.name_refusal(cert, ACME, "01") == names.NOT_FORWARDED_ONE
    assert names.name_refusal(cert, ACME, "not-hex") == names.NOT_FORWARDED_ONE


def test_a_missing_or_unreadable_certificate_is_refused(ca: CertificateAuthority) -> None:
    assert names.escaped_certificate_refusal(None, ACME, "01") == names.NO_CERTIFICATE
    assert names.escaped_certificate_refusal("", ACME, "01") == names.NO_CERTIFICATE
    garbage = quote("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert names.escaped_certificate_refusal(garbage, ACME, "01") == names.UNREADABLE
    assert names.escaped_certificate_refusal("%FF%FE", ACME, "01") == names.UNREADABLE


def test_verdicts_are_kept_per_certificate_and_bounded(ca: CertificateAuthority) -> None:
    good = certificate(ca, ACME, [uri(ACME)])
    bad = certificate(ca, ACME, [uri(ACME), uri(ACME)])
    check = names.NameCheck(max_entries=2)
    for _ in range(3):
        assert check.refusal(escaped(good), ACME, serial_of(good)) is None
        assert check.refusal(escaped(bad), ACME, serial_of(bad)) == names.NOT_ONE_NAME
    # A third certificate empties the full cache; verdicts stay right.
    third = certificate(ca, ACME, [uri(AgentIdentity("other", "prod", "agent-1"))])
    assert check.refusal(escaped(third), ACME, serial_of(third)) == names.MISMATCH
    assert check.refusal(escaped(good), ACME, serial_of(good)) is None
    assert check.refusal(None, ACME, serial_of(good)) == names.NO_CERTIFICATE


def test_the_request_check_applies_the_names_rule_after_the_trust_state(
    ca: CertificateAuthority,
) -> None:
    metrics = GatewayMetrics.create()
    keeper = CertificateCheck(metrics.certificate_checks, metrics.revocation_delay)
    issuer = ca.certificate.subject.rfc4514_string()
    keeper.state = TrustState(issuers={issuer: None})

    def forwarded(cert: x509.Certificate) -> AgentCertificate:
        return AgentCertificate(ACME, serial_of(cert), issuer, escaped(cert))

    good = certificate(ca, ACME, [uri(ACME)])
    two = certificate(ca, ACME, [uri(ACME), uri(ACME)])
    assert keeper.check(forwarded(good)) is None
    assert keeper.check(forwarded(two)) == names.NOT_ONE_NAME
    assert keeper.check(AgentCertificate(ACME, serial_of(good), issuer)) == names.NO_CERTIFICATE
    # The trust state still decides first: an unknown issuer, whatever the names.
    keeper.state = TrustState()
    assert keeper.check(forwarded(good)) == UNKNOWN_ISSUER
    counted = {
        outcome: metrics.registry.get_sample_value(
            "fleetplane_certificate_checks_total", {"outcome": outcome}
        )
        for outcome in ("allowed", "refused")
    }
    assert counted == {"allowed": 1, "refused": 3}


def test_any_forwarded_text_gets_a_verdict(ca: CertificateAuthority) -> None:
    check = names.NameCheck()
    assert check.refusal("\udcff\ud800", ACME, "01") == names.UNREADABLE

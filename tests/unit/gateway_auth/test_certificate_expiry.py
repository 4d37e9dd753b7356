"""The certificate-expiry gauge: each file's notAfter, re-read at each refresh."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from services.gateway_auth import expiry
from services.shared import metrics as m


def write_certificate(path: Path, not_after: datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - timedelta(days=30))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def exported(registry: CollectorRegistry) -> dict[str, float]:
    return {
        sample.labels["certificate"]: sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == m.CERTIFICATE_EXPIRY.name
    }


def test_refresh_exports_each_not_after_and_follows_renewals_and_removals(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    gauge = m.gauge(registry, m.CERTIFICATE_EXPIRY)
    soon = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    later = soon + timedelta(days=365)
    edge, ca = tmp_path / "edge.pem", tmp_path / "ca.pem"
    write_certificate(edge, soon)
    write_certificate(ca, later)
    files = {"edge-server": edge, "issuing-ca": ca}

    expiry.refresh(gauge, files)
    assert exported(registry) == {"edge-server": soon.timestamp(), "issuing-ca": later.timestamp()}

    write_certificate(edge, later)  # renewed
    ca.write_text("not a certificate")  # unreadable: its series goes
    expiry.refresh(gauge, files)
    assert exported(registry) == {"edge-server": later.timestamp()}

    edge.unlink()
    expiry.refresh(gauge, files)
    assert exported(registry) == {}

"""The certificate authority gateway_auth signs agent certificates with, and its policy.

This is all the running service needs of the PKI: load a CA, sign an agent's
key from its checked CSR (``sign_agent_key``). Making the development PKI's
folders and rotating its issuing CA live in ``pki`` (set-up tooling and its
CLI); the untrusted CA tests use lives in ``tests/support``.

Keys are ECDSA P-256.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Final, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.shared.identity import AgentIdentity

# RFC 5280 name constraints match a URI by its host, so this admits exactly the
# spiffe://fleetplane/... names: the issuing CA cannot mint identities elsewhere.
SPIFFE_TRUST_DOMAIN: Final = "fleetplane"

CA_VALIDITY: Final = timedelta(days=3650)
SERVER_VALIDITY: Final = timedelta(days=365)
AGENT_VALIDITY: Final = timedelta(days=1)
# Backdating absorbs small clock differences between issuer and verifier.
CLOCK_SKEW: Final = timedelta(minutes=5)


class IssuedCertificate(NamedTuple):
    certificate_pem: bytes
    private_key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def subject_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fleetplane Dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(valid_for: timedelta, not_before: datetime | None) -> tuple[datetime, datetime]:
    if valid_for <= timedelta(0):
        raise ValueError(f"validity must be positive, got {valid_for}")
    if not_before is None:
        now = datetime.now(UTC)
        return now - CLOCK_SKEW, now + valid_for
    return not_before, not_before + valid_for


_UNUSED_KEY_USAGES: Final = dict.fromkeys(
    (
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "encipher_only",
        "decipher_only",
    ),
    False,
)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    # ECDHE suites only need a leaf's key to sign the handshake; a CA's also signs
    # certificates and revocation lists.
    return x509.KeyUsage(
        digital_signature=True, key_cert_sign=ca, crl_sign=ca, **_UNUSED_KEY_USAGES
    )


def write_atomically(path: Path, data: bytes, *, private: bool = False) -> None:
    """Replace `path` atomically, so a concurrent reader never sees half a PEM file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o600 if private else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate with its key; load once and issue many certificates."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, cert_path: Path, key_path: Path | None = None) -> CertificateAuthority:
        """Load `<name>.pem` and its key (by default `<name>.key` beside it)."""
        key_path = key_path or cert_path.with_suffix(".key")
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: expected an EC private key")
        if key.public_key() != certificate.public_key():
            raise ValueError(f"{key_path} does not belong to {cert_path}")
        return cls(certificate, key)

    @classmethod
    def create_root(
        cls,
        common_name: str,
        *,
        path_length: int | None,
        valid_for: timedelta = CA_VALIDITY,
    ) -> CertificateAuthority:
        """A fresh self-signed CA."""
        key = _new_key()
        subject = subject_name(common_name)
        not_before, not_after = _validity(valid_for, None)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @cached_property
    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)

    @property
    def certificate_pem(self) -> bytes:
        return cert_pem(self.certificate)

    def _builder(
        self,
        subject: x509.Name,
        public_key: CertificatePublicKeyTypes,
        valid_for: timedelta,
        not_before: datetime | None,
    ) -> x509.CertificateBuilder:
        start, end = _validity(valid_for, not_before)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._authority_key_identifier, critical=False)
        )

    def create_intermediate(
        self,
        common_name: str,
        *,
        permitted_uri_hosts: Sequence[str] = (),
        valid_for: timedelta = CA_VALIDITY,
    ) -> CertificateAuthority:
        """A CA signed by this one that may sign only leaf certificates (pathlen 0)."""
        key = _new_key()
        builder = (
            self._builder(subject_name(common_name), key.public_key(), valid_for, None)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
        )
        if permitted_uri_hosts:
            constraints = x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(h) for h in permitted_uri_hosts],
                excluded_subtrees=None,
            )
            builder = builder.add_extension(constraints, critical=True)
        return CertificateAuthority(builder.sign(self.private_key, hashes.SHA256()), key)

    def issue(
        self,
        subject: x509.Name,
        *,
        names: Sequence[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        valid_for: timedelta,
        not_before: datetime | None = None,
    ) -> IssuedCertificate:
        """A leaf certificate with a new key, for one extended key usage."""
        key = _new_key()
        builder = (
            self._builder(subject, key.public_key(), valid_for, not_before)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.private_key, hashes.SHA256())
        return IssuedCertificate(cert_pem(certificate), key_pem(key))

    def issue_agent(
        self,
        customer_id: str,
        environment_id: str,
        agent_id: str,
        *,
        valid_for: timedelta = AGENT_VALIDITY,
        not_before: datetime | None = None,
    ) -> IssuedCertificate:
        """An agent client certificate with a new key; raises ValueError for a malformed id.

        The ids go into the subject (nginx can read it) and into a SPIFFE URI SAN
        (standard tooling reads that); `not_before` lets tests make expired ones.
        """
        identity = AgentIdentity(customer_id, environment_id, agent_id)
        key = _new_key()
        certificate = self.sign_agent_key(
            identity, key.public_key(), valid_for=valid_for, not_before=not_before
        )
        return IssuedCertificate(cert_pem(certificate), key_pem(key))

    def sign_agent_key(
        self,
        identity: AgentIdentity,
        public_key: CertificatePublicKeyTypes,
        *,
        valid_for: timedelta = AGENT_VALIDITY,
        not_before: datetime | None = None,
    ) -> x509.Certificate:
        """An agent client certificate for a key the agent holds (from its checked CSR).

        The certificate's content comes from ``identity`` and this policy only:
        nothing else a CSR asked for is copied.
        """
        return (
            self._builder(agent_subject(identity), public_key, valid_for, not_before)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.spiffe_uri)]),
                critical=False,
            )
            .sign(self.private_key, hashes.SHA256())
        )

    def save(self, pki_dir: Path, name: str) -> None:
        write_atomically(pki_dir / f"{name}.key", key_pem(self.private_key), private=True)
        write_atomically(pki_dir / f"{name}.pem", self.certificate_pem)


def agent_subject(identity: AgentIdentity) -> x509.Name:
    """The subject DN of an agent certificate: O=customer, OU=environment, CN=agent."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.customer_id),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.environment_id),
            x509.NameAttribute(NameOID.COMMON_NAME, identity.agent_id),
        ]
    )

"""The CSR policy: key types, identity, names; no network."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from services.gateway_auth.csr import (
    ExtraNames,
    IdentityMismatch,
    MalformedCsr,
    WeakKey,
    check_csr,
)
from services.shared.identity import AgentIdentity
from tests.support.enrollment import make_csr, new_key

SPIFFE = AgentIdentity("acme", "prod", "agent-1").spiffe_uri


def check(pem: str, agent_id: str | None = None) -> AgentIdentity:
    return check_csr(pem, customer_id="acme", environment_id="prod", agent_id=agent_id).identity


@pytest.mark.parametrize(
    "key_factory",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072),
    ],
    ids=["p-256", "p-384", "rsa-3072"],
)
def test_accepted_keys(key_factory: Callable[[], Any]) -> None:
    assert check(make_csr(key_factory(), "agent-1")) == AgentIdentity("acme", "prod", "agent-1")


@pytest.mark.parametrize(
    "key_factory",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        lambda: ec.generate_private_key(ec.SECP521R1()),
        lambda: ec.generate_private_key(ec.SECP256K1()),
        ed25519.Ed25519PrivateKey.generate,
    ],
    ids=["rsa-2048", "p-521", "secp256k1", "ed25519"],
)
def test_refused_keys(key_factory: Callable[[], Any]) -> None:
    key = key_factory()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-1")])
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    pem = builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(WeakKey):
        check(pem)


def test_full_dn_matching_the_token_is_accepted() -> None:
    pem = make_csr(
        new_key(),
        "agent-1",
        customer="acme",
        environment="prod",
        sans=[x509.UniformResourceIdentifier(SPIFFE)],
    )
    assert check(pem).spiffe_uri == SPIFFE


@pytest.mark.parametrize(
    ("kwargs", "agent_id"),
    [
        ({"customer": "globex"}, None),
        ({"environment": "staging"}, None),
        ({}, "agent-2"),
    ],
    ids=["customer", "environment", "bound-agent"],
)
def test_another_identity_is_refused(kwargs: dict[str, Any], agent_id: str | None) -> None:
    with pytest.raises(IdentityMismatch):
        check(make_csr(new_key(), "agent-1", **kwargs), agent_id)


def test_a_subject_without_cn_or_with_other_attributes_is_refused() -> None:
    key = new_key()
    for attributes in (
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme")],
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "agent-1"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "a@example.com"),
        ],
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "agent-1"),
            x509.NameAttribute(NameOID.COMMON_NAME, "agent-2"),
        ],
        [x509.NameAttribute(NameOID.COMMON_NAME, "Agent One")],
    ):
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
        pem = csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
        with pytest.raises(IdentityMismatch):
            check(pem)


@pytest.mark.parametrize(
    "sans",
    [
        [x509.DNSName("agent-1.example.com")],
        [x509.UniformResourceIdentifier(SPIFFE), x509.DNSName("localhost")],
        [x509.UniformResourceIdentifier(SPIFFE.replace("acme", "globex"))],
        [x509.RFC822Name("agent@example.com")],
    ],
    ids=["dns", "spiffe-plus-dns", "other-spiffe", "email"],
)
def test_names_beyond_the_agents_own_are_refused(sans: list[x509.GeneralName]) -> None:
    with pytest.raises(ExtraNames):
        check(make_csr(new_key(), "agent-1", sans=sans))


def test_a_tampered_csr_fails_its_signature_check() -> None:
    pem = make_csr(new_key(), "agent-1")
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    position = der.find(b"agent-1")
    der[position : position + 7] = b"agent-2"
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(MalformedCsr, match="signature"):
        check(tampered.decode())


@pytest.mark.parametrize(
    "pem",
    [
        "",
        "hello",
        "-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\n" + "A" * 20000,
    ],
    ids=["empty", "text", "garbage", "too-large"],
)
def test_malformed_csrs(pem: str) -> None:
    with pytest.raises(MalformedCsr):
        check(pem)

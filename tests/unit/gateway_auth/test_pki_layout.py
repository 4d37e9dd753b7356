"""The PKI folders: the root key offline, rotation, certificates signed from a CSR's key."""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.gateway_auth.pki import (
    AGENT_CA_BUNDLE,
    ISSUING_CA,
    ROOT_CA,
    init_pki,
    load_issuing_ca,
    rotate_issuing_ca,
)
from services.shared.identity import AgentIdentity
from tests.support.enrollment import new_key


def _private_keys(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]


def test_the_root_key_lives_only_in_the_offline_folder(tmp_path: Path) -> None:
    pki, offline = tmp_path / "pki", tmp_path / "pki-offline"
    init_pki(pki)
    root = x509.load_pem_x509_certificate((pki / f"{ROOT_CA}.pem").read_bytes())
    for path in _private_keys(pki):
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert key.public_key() != root.public_key(), path
    offline_key = serialization.load_pem_private_key(
        (offline / f"{ROOT_CA}.key").read_bytes(), password=None
    )
    assert offline_key.public_key() == root.public_key()
    for path in [*_private_keys(pki), *_private_keys(offline)]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(offline.stat().st_mode) == 0o700


def test_a_root_key_left_beside_the_services_is_moved_offline(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki)
    offline_key = tmp_path / "pki-offline" / f"{ROOT_CA}.key"
    # An older layout: the key beside the service files, none offline.
    (pki / f"{ROOT_CA}.key").write_bytes(offline_key.read_bytes())
    offline_key.unlink()
    before = (pki / f"{ROOT_CA}.pem").read_bytes()
    init_pki(pki)
    assert not (pki / f"{ROOT_CA}.key").exists()
    assert offline_key.exists()
    # The same root: nothing it signed had to be remade.
    assert (pki / f"{ROOT_CA}.pem").read_bytes() == before


def test_rotation_signs_a_new_issuing_ca_and_keeps_the_old_one_in_the_bundle(
    tmp_path: Path,
) -> None:
    pki = tmp_path / "pki"
    init_pki(pki)
    old, new = rotate_issuing_ca(pki)
    assert old.subject != new.subject
    root = x509.load_pem_x509_certificate((pki / f"{ROOT_CA}.pem").read_bytes())
    new.verify_directly_issued_by(root)
    assert load_issuing_ca(pki).certificate == new
    bundle = x509.load_pem_x509_certificates((pki / AGENT_CA_BUNDLE).read_bytes())
    assert {c.subject for c in bundle} == {old.subject, new.subject, root.subject}
    assert not list((pki / "retired").glob("*.key"))
    assert not (pki / f"{ROOT_CA}.key").exists()
    # A later init keeps the rotated CA and the retired one.
    init_pki(pki)
    assert x509.load_pem_x509_certificate((pki / f"{ISSUING_CA}.pem").read_bytes()) == new
    bundle = x509.load_pem_x509_certificates((pki / AGENT_CA_BUNDLE).read_bytes())
    assert old.subject in {c.subject for c in bundle}


def test_an_agent_certificate_from_a_csr_key_carries_only_the_policy(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki)
    ca = load_issuing_ca(pki)
    key = new_key()
    identity = AgentIdentity("acme", "prod", "agent-1")
    certificate = ca.sign_agent_key(identity, key.public_key())
    assert certificate.public_key() == key.public_key()
    assert certificate.subject.rfc4514_string() == "CN=agent-1,OU=prod,O=acme"
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier(identity.spiffe_uri)]
    basic = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is False
    certificate.verify_directly_issued_by(ca.certificate)

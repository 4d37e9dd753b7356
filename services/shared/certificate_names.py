"""The edge's check of what nginx cannot read in an agent certificate: its URI SANs.

An agent certificate names its identity twice: in the subject DN, which nginx
forwards and the API uses, and in a SPIFFE URI SAN, which standard tooling
reads. A certificate whose two names disagree, or that carries several URI
SANs, means different things to different readers, so it is refused: it must
carry exactly one subject alternative name, the SPIFFE URI of the identity its
subject names. nginx has no variable for URI SANs; it forwards the whole
verified certificate (``$ssl_client_escaped_cert``) to the per-request check,
and the verdict is kept per certificate, so each certificate is parsed once.

Plain logic; no aiohttp.
"""

from __future__ import annotations

import hashlib
from typing import Final
from urllib.parse import unquote

from cryptography import x509
from cryptography.x509.oid import NameOID

from services.shared.identity import AgentIdentity, IdentityError

NO_CERTIFICATE: Final = "the edge forwarded no client certificate"
UNREADABLE: Final = "the client certificate the edge forwarded could not be read"
NOT_FORWARDED_ONE: Final = "the forwarded client certificate is not the one the edge verified"
NO_URI_SAN: Final = "the client certificate carries no SPIFFE URI SAN"
NOT_ONE_NAME: Final = (
    "the client certificate must carry exactly one subject alternative name, its SPIFFE URI"
)
MISMATCH: Final = (
    "the client certificate's SPIFFE URI SAN names another identity than its subject DN"
)
MAX_VERDICTS: Final = 100_000
"""Bounds the verdict cache; it is emptied when full (a miss only costs one parse)."""


def _subject_identity(certificate: x509.Certificate) -> AgentIdentity | None:
    values: dict[x509.ObjectIdentifier, list[str]] = {}
    for attribute in certificate.subject:
        values.setdefault(attribute.oid, []).append(str(attribute.value))
    wanted = (NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.COMMON_NAME)
    if set(values) != set(wanted) or any(len(values[oid]) != 1 for oid in wanted):
        return None
    try:
        return AgentIdentity(*(values[oid][0] for oid in wanted))
    except IdentityError:
        return None


def name_refusal(certificate: x509.Certificate, identity: AgentIdentity, serial: str) -> str | None:
    """None when the certificate names ``identity`` unambiguously; else why it is refused.

    ``identity`` and ``serial`` (hex, any case or padding) are what the edge
    forwarded from the certificate it verified; the certificate must be that
    one (same serial and subject), and its only subject alternative name must
    be ``identity``'s SPIFFE URI.
    """
    try:
        forwarded_serial = int(serial, 16)
    except ValueError:
        return NOT_FORWARDED_ONE
    if forwarded_serial != certificate.serial_number:
        return NOT_FORWARDED_ONE
    if _subject_identity(certificate) != identity:
        return NOT_FORWARDED_ONE
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return NO_URI_SAN
    names = list(extension.value)
    uris = [name for name in names if isinstance(name, x509.UniformResourceIdentifier)]
    if not uris:
        return NO_URI_SAN
    if len(names) != 1:
        return NOT_ONE_NAME
    if uris[0].value != identity.spiffe_uri:
        return MISMATCH
    return None


def escaped_certificate_refusal(
    escaped_pem: str | None, identity: AgentIdentity, serial: str
) -> str | None:
    """``name_refusal`` for nginx's ``$ssl_client_escaped_cert`` (URL-encoded PEM)."""
    if not escaped_pem:
        return NO_CERTIFICATE
    try:
        certificate = x509.load_pem_x509_certificate(unquote(escaped_pem).encode("ascii"))
    except ValueError:
        return UNREADABLE
    return name_refusal(certificate, identity, serial)


class NameCheck:
    """``escaped_certificate_refusal`` with its verdicts kept per certificate.

    Keyed by everything the verdict depends on (the forwarded certificate,
    by its SHA-256, identity and serial), so a hit never answers for another
    certificate; in practice one entry per serial the edge sees, about 200
    bytes each (the certificate itself would be six times that).
    """

    def __init__(self, max_entries: int = MAX_VERDICTS) -> None:
        self._verdicts: dict[tuple[bytes, AgentIdentity, str], str | None] = {}
        self._max_entries = max_entries

    def refusal(self, escaped_pem: str | None, identity: AgentIdentity, serial: str) -> str | None:
        if escaped_pem is None:
            return NO_CERTIFICATE
        digest = hashlib.sha256(escaped_pem.encode("utf-8", "surrogatepass")).digest()
        key = (digest, identity, serial)
        try:
            return self._verdicts[key]
        except KeyError:
            pass
        verdict = escaped_certificate_refusal(escaped_pem, identity, serial)
        if len(self._verdicts) >= self._max_entries:
            self._verdicts.clear()
        self._verdicts[key] = verdict
        return verdict

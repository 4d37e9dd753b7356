"""What a certificate signing request may ask for: the policy, no I/O.

An agent makes its own key and sends a PEM CSR. The CSR proves possession of the
key (its signature) and names the agent; everything else in the certificate comes
from gateway_auth's policy, never from the CSR.

Identity rule: the CSR subject is either ``CN=<agent>`` alone, or the full agent
DN ``CN=<agent>,OU=<environment>,O=<customer>``, whose O and OU must then equal
the identity the caller is entitled to (the enrollment token's, or the current
certificate's on renewal). Its only SAN may be the agent's SPIFFE URI; any other
SAN is refused, not dropped, so an agent never believes it got a name it did not.
Requested extensions other than subjectAltName are ignored: the issued
certificate's extensions are fixed by policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from services.shared.identity import ID_PATTERN, AgentIdentity, IdentityError, check_id

MAX_CSR_BYTES: Final = 16 * 1024
ALLOWED_CURVES: Final = ("secp256r1", "secp384r1")
MIN_RSA_BITS: Final = 3072


class CsrRefused(ValueError):
    """The CSR breaks the policy; ``kind`` names which rule (a problem type), ``str`` says how."""

    kind = "invalid-csr"


class MalformedCsr(CsrRefused):
    kind = "malformed-csr"


class WeakKey(CsrRefused):
    kind = "weak-key"


class IdentityMismatch(CsrRefused):
    kind = "identity-mismatch"


class ExtraNames(CsrRefused):
    kind = "extra-names"


@dataclass(frozen=True, slots=True)
class CheckedCsr:
    """A CSR that passed the policy: whom to certify, and the key to certify."""

    identity: AgentIdentity
    public_key: CertificatePublicKeyTypes


def load_csr(pem: str) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check its signature; raises MalformedCsr."""
    data = pem.encode("utf-8", errors="replace")
    if len(data) > MAX_CSR_BYTES:
        raise MalformedCsr(f"the CSR is larger than {MAX_CSR_BYTES} bytes")
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in data:
        raise MalformedCsr("send the CSR in PEM form (-----BEGIN CERTIFICATE REQUEST-----)")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise MalformedCsr("the CSR could not be parsed as PKCS#10 PEM") from e
    try:
        valid = csr.is_signature_valid
    except Exception as e:  # an unsupported algorithm surfaces here, as various errors
        raise MalformedCsr("the CSR's signature algorithm is not supported") from e
    if not valid:
        raise MalformedCsr("the CSR's signature does not match its public key")
    return csr


def check_key(public_key: CertificatePublicKeyTypes) -> None:
    """Raise WeakKey unless the key is ECDSA P-256/P-384 or RSA of at least 3072 bits."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ALLOWED_CURVES:
            raise WeakKey("this ECDSA curve is not accepted; use P-256 or P-384")
        return
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise WeakKey(
                f"RSA keys of {public_key.key_size} bits are not accepted; "
                f"use at least {MIN_RSA_BITS} bits, or ECDSA P-256"
            )
        return
    raise WeakKey("only ECDSA P-256/P-384 and RSA (3072 bits or more) keys are accepted")


def _single(csr: x509.CertificateSigningRequest, oid: x509.ObjectIdentifier) -> str | None:
    values = csr.subject.get_attributes_for_oid(oid)
    if len(values) > 1:
        raise IdentityMismatch("the CSR subject repeats an attribute")
    if not values:
        return None
    value = values[0].value
    return value if isinstance(value, str) else None


def requested_agent_id(csr: x509.CertificateSigningRequest) -> str:
    """The agent name: the subject's one CN. Raises IdentityMismatch."""
    allowed = {NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME}
    for attribute in csr.subject:
        if attribute.oid not in allowed:
            raise IdentityMismatch("the CSR subject may hold only CN (and O, OU)")
    agent_id = _single(csr, NameOID.COMMON_NAME)
    if agent_id is None:
        raise IdentityMismatch("the CSR subject must carry the agent name as CN")
    try:
        return check_id("agent", agent_id)
    except IdentityError:
        # Not echoed: problem bodies never repeat input.
        raise IdentityMismatch(f"the CSR's CN must be an agent id matching {ID_PATTERN}") from None


def check_csr(
    pem: str, *, customer_id: str, environment_id: str, agent_id: str | None = None
) -> CheckedCsr:
    """Apply the whole policy for a caller entitled to (customer, environment[, agent]).

    ``agent_id`` None lets the CSR choose the agent name (enrollment with a token
    bound to an environment only). Raises a CsrRefused subclass naming the rule.
    """
    csr = load_csr(pem)
    check_key(csr.public_key())
    name = requested_agent_id(csr)
    if agent_id is not None and name != agent_id:
        raise IdentityMismatch("the CSR's CN names another agent than the one this caller may be")
    for oid, expected, what in (
        (NameOID.ORGANIZATION_NAME, customer_id, "customer (O)"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, environment_id, "environment (OU)"),
    ):
        value = _single(csr, oid)
        if value is not None and value != expected:
            raise IdentityMismatch(
                f"the CSR asks for another {what} than this caller may have; "
                "send CN=<agent> alone, or the caller's own O and OU"
            )
    identity = AgentIdentity(customer_id, environment_id, name)
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = None
    except ValueError as e:
        raise MalformedCsr("the CSR's extensions could not be parsed") from e
    if sans is not None:
        names = list(sans)
        if names != [x509.UniformResourceIdentifier(identity.spiffe_uri)]:
            raise ExtraNames(
                "the CSR may name only the agent's own SPIFFE ID "
                "(spiffe://fleetplane/customer/<c>/env/<e>/agent/<a>) as subjectAltName, or none"
            )
    return CheckedCsr(identity, csr.public_key())

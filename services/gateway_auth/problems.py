"""gateway_auth's own problem types (RFC 9457), on the shared Problem hierarchy."""

from __future__ import annotations

from services.gateway_auth.csr import (
    CsrRefused,
    ExtraNames,
    IdentityMismatch,
    MalformedCsr,
    WeakKey,
)
from services.shared.problems import Problem


class InvalidEnrollmentToken(Problem):
    status = 401
    slug = "invalid-enrollment-token"
    title = "Unknown enrollment token"


class EnrollmentTokenUsed(Problem):
    status = 409
    slug = "enrollment-token-used"
    title = "Enrollment token already used"


class EnrollmentTokenExpired(Problem):
    status = 410
    slug = "enrollment-token-expired"
    title = "Enrollment token expired"


class CertificateRefused(Problem):
    """The caller's certificate is revoked or its issuing CA is no longer trusted."""

    status = 403
    slug = "certificate-refused"
    title = "Client certificate refused"


class MalformedCsrProblem(Problem):
    status = 400
    slug = "malformed-csr"
    title = "Malformed certificate signing request"


class WeakKeyProblem(Problem):
    status = 422
    slug = "weak-key"
    title = "Key type or size not accepted"


class IdentityMismatchProblem(Problem):
    status = 403
    slug = "identity-mismatch"
    title = "The CSR asks for an identity the caller may not have"


class ExtraNamesProblem(Problem):
    status = 422
    slug = "extra-names"
    title = "The CSR asks for names beyond the agent's own"


_CSR_PROBLEMS: dict[type[CsrRefused], type[Problem]] = {
    MalformedCsr: MalformedCsrProblem,
    WeakKey: WeakKeyProblem,
    IdentityMismatch: IdentityMismatchProblem,
    ExtraNames: ExtraNamesProblem,
}


def csr_problem(refused: CsrRefused) -> Problem:
    """The problem answer for a CSR policy refusal (malformed CSRs are 400s)."""
    return _CSR_PROBLEMS.get(type(refused), MalformedCsrProblem)(str(refused))

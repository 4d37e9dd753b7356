"""A certificate authority nobody trusts, for tests of refusal at the edge."""

from __future__ import annotations

from datetime import timedelta

from services.gateway_auth.ca import AGENT_VALIDITY, CertificateAuthority
from services.gateway_auth.pki import ISSUING_CA_NAME


def issue_foreign_ca_agent(
    customer_id: str,
    environment_id: str,
    agent_id: str,
    *,
    valid_for: timedelta = AGENT_VALIDITY,
) -> tuple[bytes, bytes]:
    """A well-formed agent certificate from a throwaway CA that nobody trusts.

    The throwaway CA copies the real issuing CA's name, so only signature
    verification (not a comparison of issuer names) can tell the two apart.
    """
    foreign = CertificateAuthority.create_root(
        ISSUING_CA_NAME, path_length=0, valid_for=timedelta(days=2)
    )
    return foreign.issue_agent(customer_id, environment_id, agent_id, valid_for=valid_for)

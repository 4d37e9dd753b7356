"""Unambiguous agent identity through the real edge.

Certificates are signed by the stack's real issuing CA, so nginx verifies
every one of them; only the API's per-request check (which reads the URI
SANs nginx cannot) stands between an ambiguous certificate and the API.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from services.gateway_auth.ca import CertificateAuthority, agent_subject
from services.shared import certificate_names as names
from services.shared.identity import AgentIdentity
from tests.support.agents import AgentClient, agent_ssl_context
from tests.support.deployment import Deployment

ACME = AgentIdentity("acme", "prod", "agent-1")
PROBE = "/v1/events/ev-probe"


def agent_with_names(
    ca: CertificateAuthority,
    deployment: Deployment,
    tmp_path: Path,
    sans: list[x509.GeneralName],
    stem: str,
) -> AgentClient:
    issued = ca.issue(
        agent_subject(ACME),
        names=sans,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        valid_for=timedelta(hours=1),
    )
    cert, key = tmp_path / f"{stem}.pem", tmp_path / f"{stem}.key"
    cert.write_bytes(issued.certificate_pem)
    key.write_bytes(issued.private_key_pem)
    key.chmod(0o600)
    stack = deployment.fleet.stack
    context = agent_ssl_context(stack.pki_dir, cert, key)
    return AgentClient(
        ACME.customer_id, ACME.environment_id, ACME.agent_id, stack.edge_url, context
    ).open()


def uri(identity: AgentIdentity) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(identity.spiffe_uri)


AMBIGUOUS: dict[str, tuple[list[x509.GeneralName], str]] = {
    "san-names-another-customer": (
        [uri(AgentIdentity("victim", "prod", "agent-1"))],
        names.MISMATCH,
    ),
    "two-uri-sans": (
        [uri(ACME), uri(AgentIdentity("victim", "prod", "agent-1"))],
        names.NOT_ONE_NAME,
    ),
    "dns-san-only": ([x509.DNSName("agent-1.acme.example")], names.NO_URI_SAN),
    "no-san": ([], names.NO_URI_SAN),
}


async def test_ambiguous_certificates_of_the_real_ca_are_refused_with_a_problem(
    deployment: Deployment, issuing_ca: CertificateAuthority, tmp_path: Path
) -> None:
    """One deployment for every case: starting one costs seconds, a case milliseconds."""
    deployment.start_apis()
    fine = agent_with_names(issuing_ca, deployment, tmp_path, [uri(ACME)], "fine")
    try:
        # The same subject with the policy's one URI SAN passes: only the names differ.
        status, body = await fine.get(PROBE)
        assert status == 200, body
        for case, (sans, reason) in AMBIGUOUS.items():
            agent = agent_with_names(issuing_ca, deployment, tmp_path, sans, case)
            try:
                for attempt in range(2):  # the second answer comes from the edge's cache
                    status, body = await agent.get(PROBE)
                    assert status == 403, (case, attempt, body)
                    assert body["type"] == "urn:fleetplane:problem:certificate-refused"
                    assert body["status"] == 403
                    assert body["detail"] == reason, case
                status, body = await agent.post_events([agent.heartbeat()])
                assert (status, body["detail"]) == (403, reason), case
            finally:
                await agent.close()
    finally:
        await fine.close()


async def test_a_client_cannot_forward_a_certificate_of_its_own(
    deployment: Deployment, issuing_ca: CertificateAuthority, tmp_path: Path
) -> None:
    """The check reads the certificate nginx verified, never one the client sends."""
    deployment.start_apis()
    agent = agent_with_names(issuing_ca, deployment, tmp_path, [], "no-san")
    fine = agent_with_names(issuing_ca, deployment, tmp_path, [uri(ACME)], "fine")
    # One line (the agent WAF refuses control characters in headers): read as
    # the certificate, it would pass or be unreadable, never "no URI SAN".
    good_pem = (tmp_path / "fine.pem").read_text().replace("\n", "")
    try:
        assert agent.session is not None
        async with agent.session.get(
            f"{deployment.fleet.stack.edge_url}{PROBE}",
            headers={"X-Fleetplane-Client-Cert": good_pem},
        ) as reply:
            body = await reply.json(content_type=None)
        assert (reply.status, body["detail"]) == (403, names.NO_URI_SAN)
    finally:
        await agent.close()
        await fine.close()

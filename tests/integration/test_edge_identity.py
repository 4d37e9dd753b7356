"""Invariant 1: identity comes only from the verified client certificate."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.gateway_auth.ca import CertificateAuthority
from services.shared.identity import AgentIdentity
from tests.support.agents import AgentClient, agent_ssl_context
from tests.support.deployment import Deployment
from tests.support.foreign_ca import issue_foreign_ca_agent
from tests.support.operators import OperatorClient
from tests.support.waiting import eventually

AgentFactory = Any
HEARTBEAT = {
    "id": "hb-1",
    "boot_id": "boot-1",
    "seq": 1,
    "type": "heartbeat",
    "payload": {"agent_version": "1.0.0", "health": "ok"},
}


async def post(context: ssl.SSLContext, url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.post(url, **kwargs) as reply,
    ):
        return reply.status, await reply.json(content_type=None)


async def test_edge_refuses_a_request_without_client_certificate(deployment: Deployment) -> None:
    deployment.start_apis()
    context = agent_ssl_context(deployment.fleet.stack.pki_dir, None, None)
    status, body = await post(
        context, f"{deployment.fleet.stack.edge_url}/v1/events", json={"events": [HEARTBEAT]}
    )
    assert status == 401
    assert body["status"] == 401
    assert await events_answered_by_apis(deployment) == 0


async def assert_refused(
    deployment: Deployment, tmp_path: Path, cert_pem: bytes, key_pem: bytes
) -> None:
    """The edge refuses an event sent with this certificate, and nothing reaches the API."""
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    context = agent_ssl_context(deployment.fleet.stack.pki_dir, cert, key)
    before = await events_answered_by_apis(deployment)
    status, body = await post(
        context, f"{deployment.fleet.stack.edge_url}/v1/events", json={"events": [HEARTBEAT]}
    )
    # nginx completes the handshake (ssl_verify_client records the failure rather
    # than aborting it) and answers a certificate it cannot verify with its 401
    # problem, without proxying the request.
    assert status == 401, body
    assert body["status"] == 401
    assert await events_answered_by_apis(deployment) == before


async def events_answered_by_apis(deployment: Deployment) -> float:
    """How many requests to /v1/events the running APIs have answered, read from their /metrics."""
    return await deployment.api_metric("fleetplane_api_requests", route="/v1/events")


async def test_edge_refuses_a_certificate_from_another_ca(
    deployment: Deployment, tmp_path: Path
) -> None:
    deployment.start_apis()
    await assert_refused(deployment, tmp_path, *issue_foreign_ca_agent("acme", "prod", "agent-1"))


async def test_edge_refuses_a_self_signed_certificate(
    deployment: Deployment, tmp_path: Path
) -> None:
    deployment.start_apis()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "prod"),
            x509.NameAttribute(NameOID.COMMON_NAME, "agent-1"),
        ]
    )
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(
                        AgentIdentity("acme", "prod", "agent-1").spiffe_uri
                    )
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    await assert_refused(
        deployment,
        tmp_path,
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


async def test_edge_refuses_an_expired_certificate_of_our_own_ca(
    deployment: Deployment, tmp_path: Path, issuing_ca: CertificateAuthority
) -> None:
    deployment.start_apis()
    expired = issuing_ca.issue_agent(
        "acme", "prod", "agent-1",
        valid_for=timedelta(hours=1),
        not_before=datetime.now(UTC) - timedelta(hours=2),
    )  # fmt: skip
    await assert_refused(deployment, tmp_path, expired.certificate_pem, expired.private_key_pem)


async def test_spoofed_identity_headers_are_replaced_by_the_certificate_identity(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    deployment.start_controller()
    agent: AgentClient = agents("acme", "prod", "agent-1")
    event = agent.heartbeat()
    status, body = await agent.post_events(
        [event],
        headers={
            "X-Fleetplane-Client-DN": "CN=agent-9,OU=prod,O=victim",
            "X-Fleetplane-Client-Verify": "SUCCESS",
            "X-Fleetplane-Identity": "victim",
        },
    )
    assert status == 202, body
    await eventually(
        lambda: agent.event_status(event["id"]),
        lambda r: r[1]["status"] == "applied",
        what="spoofing agent's event applied",
    )
    victim: AgentClient = agents("victim", "prod", "agent-9")
    _, seen = await victim.event_status(event["id"])
    assert seen["status"] == "pending"
    with psycopg.connect(deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)) as conn:
        owners = conn.execute(
            "SELECT customer_id, environment_id, agent_id FROM event_records WHERE event_id = %s",
            (event["id"],),
        ).fetchall()
    assert owners == [("acme", "prod", "agent-1")]


@pytest.mark.parametrize("with_headers", [True, False], ids=["identity-headers", "no-headers"])
async def test_api_refuses_identity_not_forwarded_by_the_edge(
    deployment: Deployment, with_headers: bool
) -> None:
    """A caller that reaches the API directly cannot present an identity at all."""
    api = deployment.start_api(deployment.fleet.stack.api_ports[0])
    headers = (
        {
            "X-Fleetplane-Client-DN": "CN=agent-1,OU=prod,O=acme",
            "X-Fleetplane-Client-Verify": "SUCCESS",
        }
        if with_headers
        else {}
    )
    port = deployment.fleet.stack.api_ports[0]
    status, body = await post(
        deployment.api_ssl_context(),
        f"https://127.0.0.1:{port}/v1/events",
        json={"events": [HEARTBEAT]},
        headers=headers,
    )
    assert status == (403 if with_headers else 401), body
    assert body["status"] == status
    assert body["title"]
    assert api.alive()


async def test_an_agent_cannot_read_another_customers_event(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    deployment.start_controller()
    owner: AgentClient = agents("customer-a", "prod", "agent-1")
    intruder: AgentClient = agents("customer-b", "prod", "agent-1")
    event = owner.heartbeat(message="secret of customer a")
    status, _ = await owner.post_events([event])
    assert status == 202
    await eventually(
        lambda: owner.event_status(event["id"]),
        lambda r: r[1]["status"] == "applied",
        what="owner's event applied",
    )
    code, body = await intruder.event_status(event["id"])
    assert code == 200
    assert body == {"id": event["id"], "status": "pending"}


async def test_edge_refuses_a_revoked_certificate(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    stack = deployment.fleet.stack
    agent: AgentClient = agents("acme", "prod", "agent-1")
    neighbour: AgentClient = agents("acme", "prod", "agent-2")
    assert (await agent.post_events([agent.heartbeat()]))[0] == 202
    # The count assert_refused compares does see a request the edge lets through.
    assert await events_answered_by_apis(deployment) == 1
    operator = OperatorClient(stack.pki_dir, deployment.operator_key("acme"), stack.operator_url)
    status, body = await operator.request(
        "POST",
        "/v1/operator/customers/acme/revocations",
        {"environment_id": "prod", "agent_id": "agent-1"},
    )
    assert status == 201, body
    status, body = await eventually(
        lambda: agent.post_events([agent.heartbeat()]),
        lambda r: r[0] != 202,
        timeout_s=5.0,
        what="the revoked certificate refused within 5 s",
    )
    assert status == 403, body
    assert body["type"] == "urn:fleetplane:problem:certificate-refused"
    assert "revoked" in body["detail"]
    assert (await neighbour.post_events([neighbour.heartbeat()]))[0] == 202

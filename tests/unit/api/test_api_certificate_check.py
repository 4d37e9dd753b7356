"""The API checks every agent request's certificate itself (services/shared/certificate_check.py).

Through the app over real TLS with fakes for Kafka and PostgreSQL; the real
edge, gateway_auth's revocations and the real issuing CA are in
tests/integration/test_agent_identity.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from sqlalchemy.exc import OperationalError

from services.api.keys import WATCH
from services.gateway_auth.ca import CertificateAuthority, agent_subject
from services.shared.certificate_check import IssuerRecord
from services.shared.identity import AgentIdentity
from services.shared.revocations import Revocation, TrustState

from .conftest import (
    AGENT,
    AGENT_CERTIFICATE,
    AGENT_ISSUER_DN,
    JSON,
    Client,
    FakeProducer,
    FakeRepository,
    problem,
)
from .events_data import batch_body, heartbeat

ACME = AgentIdentity("acme", "prod", "agent-1")


async def post(edge: Client, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    response = await edge.post("/v1/events", data=batch_body(heartbeat("e1")), headers=headers)
    if response.status == 202:
        return 202, await response.json()
    return response.status, await problem(response, response.status)


async def test_a_revoked_certificate_is_refused_on_every_agent_route(
    edge: Client, producer: FakeProducer
) -> None:
    assert (await post(edge, AGENT | JSON))[0] == 202
    revoked = Revocation("acme", "prod", "agent-1", datetime.now(UTC))
    edge.app[WATCH].update(
        TrustState(revocations={("acme", "prod"): [revoked]}, issuers={AGENT_ISSUER_DN: None})
    )
    status, body = await post(edge, AGENT | JSON)
    assert (status, body["type"]) == (403, "urn:fleetplane:problem:certificate-refused")
    assert body["detail"] == "the client certificate was revoked"
    for path in ("/v1/events/e1", "/v1/commands?wait=0"):
        refused = await problem(await edge.get(path, headers=AGENT), 403)
        assert refused["type"] == "urn:fleetplane:problem:certificate-refused"
    assert len(producer.sent) == 1


async def test_a_retired_issuing_ca_is_refused(edge: Client) -> None:
    retired = datetime.now(UTC) - timedelta(seconds=1)
    edge.app[WATCH].update(TrustState(issuers={AGENT_ISSUER_DN: retired}))
    status, body = await post(edge, AGENT | JSON)
    assert status == 403
    assert body["detail"] == "the client certificate's issuing CA was retired"


async def test_an_issuing_ca_registered_since_the_last_reload_is_asked_for_once(
    edge: Client, repository: FakeRepository
) -> None:
    """gateway_auth registers a rotated CA and enrolls an agent with it; the agent's first
    request may arrive before the NOTIFY: the database decides, not the stale state."""
    edge.app[WATCH].update(TrustState())
    repository.issuers[AGENT_ISSUER_DN] = IssuerRecord(AGENT_ISSUER_DN, None)
    assert (await post(edge, AGENT | JSON))[0] == 202
    # Now known here: the next request needs no lookup.
    repository.error = OperationalError("SELECT", {}, Exception("database down"))
    assert (await post(edge, AGENT | JSON))[0] == 202


async def test_an_issuing_ca_nobody_registered_is_refused(
    edge: Client, repository: FakeRepository
) -> None:
    edge.app[WATCH].update(TrustState())
    status, body = await post(edge, AGENT | JSON)
    assert status == 403
    assert body["detail"] == "the client certificate's issuing CA is not trusted"


async def test_ambiguous_names_are_refused(edge: Client) -> None:
    root = CertificateAuthority.create_root("Other Root", path_length=1)
    issuing = root.create_intermediate("Other Issuing", permitted_uri_hosts=["fleetplane"])
    other = AgentIdentity("other", "prod", "agent-1")
    issued = issuing.issue(
        agent_subject(ACME),
        names=[x509.UniformResourceIdentifier(other.spiffe_uri)],
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        valid_for=timedelta(hours=1),
    )
    certificate = x509.load_pem_x509_certificate(issued.certificate_pem)
    issuer = issuing.certificate.subject.rfc4514_string()
    edge.app[WATCH].update(TrustState(issuers={issuer: None, AGENT_ISSUER_DN: None}))
    headers = {
        **AGENT,
        "X-Fleetplane-Client-Serial": format(certificate.serial_number, "X"),
        "X-Fleetplane-Client-Issuer-DN": issuer,
        "X-Fleetplane-Client-Cert": quote(
            certificate.public_bytes(serialization.Encoding.PEM).decode(), safe=""
        ),
    }
    status, body = await post(edge, headers | JSON)
    assert status == 403
    assert "names another identity" in str(body["detail"])
    # The forwarded certificate must be the one whose subject and serial the edge forwarded.
    status, body = await post(edge, {**AGENT, "X-Fleetplane-Client-Serial": "01"} | JSON)
    assert status == 403
    assert body["detail"] == "the forwarded client certificate is not the one the edge verified"


async def test_no_state_loaded_yet_is_503_and_not_ready(edge: Client) -> None:
    edge.app[WATCH].check.state = None
    status, body = await post(edge, AGENT | JSON)
    assert status == 503
    assert body["detail"] == "the revocation state is not loaded yet"
    ready = await problem(await edge.get("/readyz"), 503)
    assert "revocation state not loaded yet" in ready["detail"]


async def test_a_certificate_issued_after_the_revocation_is_looked_up_once_per_state(
    edge: Client, repository: FakeRepository
) -> None:
    """The operator let a revoked agent enroll again and its first request arrives before
    the NOTIFY of its new certificate: the database's record decides, once."""
    revoked = Revocation("acme", "prod", "agent-1", datetime.now(UTC) - timedelta(minutes=1))
    state = TrustState(revocations={("acme", "prod"): [revoked]}, issuers={AGENT_ISSUER_DN: None})
    edge.app[WATCH].update(state)
    # Not recorded by gateway_auth (made offline): refused by identity, looked up once.
    assert (await post(edge, AGENT | JSON))[0] == 403
    repository.error = OperationalError("SELECT", {}, Exception("database down"))
    assert (await post(edge, AGENT | JSON))[0] == 403
    # A reloaded state may know it now; meanwhile gateway_auth recorded it as issued
    # after the revocation.
    repository.error = None
    repository.certificates[format(AGENT_CERTIFICATE.serial_number, "x")] = datetime.now(UTC)
    edge.app[WATCH].update(state)
    assert (await post(edge, AGENT | JSON))[0] == 202

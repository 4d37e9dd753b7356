"""Simulated agents renew at about two thirds of their certificate's lifetime."""

from __future__ import annotations

import json
import random
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench.simulator.renewal import RENEW_PATH, Renewer, renew_delay_s
from bench.simulator.transport import Reply
from services.gateway_auth.ca import CertificateAuthority
from services.gateway_auth.csr import check_csr
from services.gateway_auth.pki import init_pki, load_issuing_ca
from services.shared.identity import AgentIdentity

IDENTITY = AgentIdentity("cust-0", "env-0", "agent-0")


class SigningEdge:
    """Answers POST /v1/renew like gateway_auth: the CSR checked and signed, or a refusal."""

    def __init__(self, ca: CertificateAuthority, status: int = 201) -> None:
        self.ca = ca
        self.status = status
        self.requests: list[tuple[str, str, bytes | None]] = []

    async def request(
        self, method: str, path: str, *, body: bytes | None = None, timeout_s: float
    ) -> Reply:
        self.requests.append((method, path, body))
        if self.status != 201:
            return Reply(self.status, b'{"title":"refused"}')
        assert body is not None
        checked = check_csr(
            json.loads(body)["csr"],
            customer_id=IDENTITY.customer_id,
            environment_id=IDENTITY.environment_id,
            agent_id=IDENTITY.agent_id,
        )
        certificate = self.ca.sign_agent_key(checked.identity, checked.public_key)
        chain = certificate.public_bytes(serialization.Encoding.PEM) + self.ca.certificate_pem
        return Reply(201, json.dumps({"certificate_chain": chain.decode()}).encode())


def test_renewal_is_due_at_two_thirds_of_the_lifetime(tmp_path: Path) -> None:
    init_pki(tmp_path / "pki")
    ca = load_issuing_ca(tmp_path / "pki")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    issued = ca.issue_agent("cust-0", "env-0", "agent-0", valid_for=timedelta(hours=3),
                            not_before=start)  # fmt: skip
    certificate = x509.load_pem_x509_certificate(issued.certificate_pem)
    assert renew_delay_s(certificate, start, lambda a, b: 0.0) == 2 * 3600
    # Jitter moves it by at most 5 % of the lifetime either way.
    assert renew_delay_s(certificate, start, lambda a, b: b) == 2 * 3600 + 0.05 * 3 * 3600
    assert renew_delay_s(certificate, start + timedelta(hours=3), lambda a, b: 0.0) == 0


async def test_a_renewal_swaps_in_the_new_certificate(tmp_path: Path) -> None:
    init_pki(tmp_path / "pki")
    ca = load_issuing_ca(tmp_path / "pki")
    first = x509.load_pem_x509_certificate(ca.issue_agent("cust-0", "env-0", "agent-0")[0])
    edge = SigningEdge(ca)
    used: list[ssl.SSLContext] = []
    renewer = Renewer(
        IDENTITY, first, edge, used.append, tmp_path / "pki" / "root-ca.pem", random.Random(1)
    )
    assert await renewer.renew_once()
    assert [(m, p) for m, p, _ in edge.requests] == [("POST", RENEW_PATH)]
    assert len(used) == 1
    assert renewer.certificate.serial_number != first.serial_number
    assert renewer.certificate.subject == first.subject
    assert renewer.renewals == 1


async def test_a_refused_renewal_keeps_the_current_certificate(tmp_path: Path) -> None:
    init_pki(tmp_path / "pki")
    ca = load_issuing_ca(tmp_path / "pki")
    first = x509.load_pem_x509_certificate(ca.issue_agent("cust-0", "env-0", "agent-0")[0])
    used: list[ssl.SSLContext] = []
    renewer = Renewer(
        IDENTITY, first, SigningEdge(ca, 403), used.append, tmp_path / "pki" / "root-ca.pem",
        random.Random(1),
    )  # fmt: skip
    assert not await renewer.renew_once()
    assert used == []
    assert renewer.certificate == first

"""Certificate renewal for simulated agents: at about two thirds of the lifetime.

An agent's certificate is renewed the way a real agent renews it: a new key, a
CSR naming only the agent (``CN=<agent>``), ``POST /v1/renew`` on the agent
listener with the current certificate, then every later connection presents
the new one. The first certificate comes from the development CA (standing in
for enrollment, which needs an operator's token per agent).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.simulator.transport import NETWORK_ERRORS, Transport, agent_ssl_context
from services.shared.identity import AgentIdentity

log = logging.getLogger(__name__)

RENEW_PATH: Final = "/v1/renew"
RENEW_AT: Final = 2 / 3
"""Share of the lifetime after which the agent renews."""
JITTER: Final = 0.05
"""Plus or minus this share of the lifetime, so a fleet issued together does not
renew in the same second."""
RETRY_S: Final = (5.0, 30.0)
"""Pause range after a failed renewal; the old certificate is still valid meanwhile."""
REQUEST_TIMEOUT_S: Final = 30.0

Sleep = Callable[[float], Awaitable[None]]


def renew_delay_s(
    certificate: x509.Certificate, now: datetime, uniform: Callable[[float, float], float]
) -> float:
    """Seconds from ``now`` until this certificate should be renewed (0 if overdue)."""
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    lifetime = (end - start).total_seconds()
    share = RENEW_AT + uniform(-JITTER, JITTER)
    due = start + timedelta(seconds=lifetime * share)
    return max((due - now).total_seconds(), 0.0)


def renewal_request(identity: AgentIdentity) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """(new key, JSON body of the renewal request) for ``identity``."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.agent_id)]))
        .sign(key, hashes.SHA256())
    )
    body = {"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
    return key, json.dumps(body).encode()


def context_for(root_ca: Path, chain_pem: bytes, key: ec.EllipticCurvePrivateKey) -> ssl.SSLContext:
    """A client context for a chain and key (ssl loads keys only from files: a private
    temporary folder, removed at once)."""
    with tempfile.TemporaryDirectory(prefix="fleetplane-sim-") as folder:
        cert_path, key_path = Path(folder) / "agent.pem", Path(folder) / "agent.key"
        key_path.touch(mode=0o600)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        cert_path.write_bytes(chain_pem)
        return agent_ssl_context(root_ca, cert_path, key_path)


class Renewer:
    """Keeps one agent's certificate current; ``run`` loops until cancelled."""

    def __init__(
        self,
        identity: AgentIdentity,
        certificate: x509.Certificate,
        transport: Transport,
        use_context: Callable[[ssl.SSLContext], None],
        root_ca: Path,
        rng: random.Random,
        *,
        sleep: Sleep = asyncio.sleep,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.identity = identity
        self.certificate = certificate
        self.renewals = 0
        self._transport = transport
        self._use_context = use_context
        self._root_ca = root_ca
        self._rng = rng
        self._sleep = sleep
        self._now = now

    async def run(self) -> None:
        while True:
            await self._sleep(renew_delay_s(self.certificate, self._now(), self._rng.uniform))
            while not await self.renew_once():
                await self._sleep(self._rng.uniform(*RETRY_S))

    async def renew_once(self) -> bool:
        """Ask for the next certificate; True once it is in use."""
        key, body = renewal_request(self.identity)
        try:
            reply = await self._transport.request(
                "POST", RENEW_PATH, body=body, timeout_s=REQUEST_TIMEOUT_S
            )
        except NETWORK_ERRORS as e:
            log.warning("%s: renewal failed (%s); retrying", self.identity.agent_id, e)
            return False
        if reply.status != 201:
            log.warning(
                "%s: renewal answered %d: %s",
                self.identity.agent_id,
                reply.status,
                reply.body[:300].decode(errors="replace"),
            )
            return False
        chain = json.loads(reply.body)["certificate_chain"].encode()
        certificate = x509.load_pem_x509_certificates(chain)[0]
        if certificate.subject != self.certificate.subject:
            log.warning("%s: renewal returned another identity; ignored", self.identity.agent_id)
            return False
        self._use_context(await asyncio.to_thread(context_for, self._root_ca, chain, key))
        self.certificate = certificate
        self.renewals += 1
        return True

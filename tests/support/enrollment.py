"""Enrolling test agents the way a real agent does: its own key, a CSR, a token."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from tests.support.agents import AgentClient, agent_ssl_context
from tests.support.operators import OperatorClient


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(
    key: CertificateIssuerPrivateKeyTypes,
    agent: str,
    *,
    customer: str | None = None,
    environment: str | None = None,
    sans: Sequence[x509.GeneralName] = (),
) -> str:
    attributes = []
    if customer is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, customer))
    if environment is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, environment))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, agent))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def weak_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def write_identity(out_dir: Path, name: str, chain_pem: str, key: Any) -> tuple[Path, Path]:
    """Write the issued chain and the agent's key as an agent would: the key 0600."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / f"{name}.pem", out_dir / f"{name}.key"
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    cert_path.write_text(chain_pem)
    return cert_path, key_path


async def post_json(
    context: ssl.SSLContext, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.post(url, json=body, headers=headers) as reply,
    ):
        return reply.status, await reply.json(content_type=None)


@dataclass
class Enroller:
    """An operator who hands out tokens and an agent-side client for the enrollment listener."""

    pki_dir: Path
    enroll_url: str
    edge_url: str
    operator: OperatorClient
    out_dir: Path

    async def token(self, customer: str, environment: str, **extra: Any) -> str:
        status, body = await self.operator.request(
            "POST",
            f"/v1/operator/customers/{customer}/enrollment-tokens",
            {"environment_id": environment, **extra},
        )
        assert status == 201, body
        token: str = body["token"]
        return token

    async def enroll(self, token: str, csr: str) -> tuple[int, dict[str, Any]]:
        context = ssl.create_default_context(cafile=str(self.pki_dir / "root-ca.pem"))
        return await post_json(
            context, f"{self.enroll_url}/v1/enroll", {"token": token, "csr": csr}
        )

    async def enrolled_agent(
        self, customer: str, environment: str, agent: str
    ) -> tuple[AgentClient, dict[str, Any], Path, Path]:
        """A new agent enrolled end to end: (client, issue answer, chain path, key path)."""
        key = new_key()
        status, issued = await self.enroll(
            await self.token(customer, environment), make_csr(key, agent)
        )
        assert status == 201, issued
        cert, key_path = write_identity(
            self.out_dir, f"{customer}.{environment}.{agent}", issued["certificate_chain"], key
        )
        client = AgentClient(
            customer,
            environment,
            agent,
            self.edge_url,
            agent_ssl_context(self.pki_dir, cert, key_path),
        ).open()
        return client, issued, cert, key_path


def tls12_context(pki_dir: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """An agent context pinned to TLS 1.2, whose session ids the edge's cache resumes."""
    context = agent_ssl_context(pki_dir, cert, key)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def raw_get(
    context: ssl.SSLContext,
    port: int,
    path: str,
    *,
    session: ssl.SSLSession | None = None,
) -> tuple[int, bool, ssl.SSLSession | None]:
    """One request on a new TCP connection: (status, whether TLS resumed ``session``, session)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        response = http.client.HTTPResponse(tls)
        response.begin()
        response.read()
        return response.status, bool(tls.session_reused), tls.session


class KeptAliveConnection:
    """One TLS connection reused for every request (HTTP/1.1 keep-alive)."""

    def __init__(self, context: ssl.SSLContext, port: int) -> None:
        self._connection = http.client.HTTPSConnection(
            "localhost", port, context=context, timeout=10
        )
        self._socket: socket.socket | None = None

    def get(self, path: str) -> int:
        """The status of one more request; fails if it did not go over the first connection."""
        before = self._connection.sock
        self._connection.request("GET", path)
        response = self._connection.getresponse()
        response.read()
        if self._socket is None:
            self._socket = self._connection.sock
        # http.client reopens a closed connection silently: the request went
        # out on the first socket only if that socket was still open before it.
        assert before is None or before is self._socket, "connection reopened"
        return response.status

    def close(self) -> None:
        self._connection.close()

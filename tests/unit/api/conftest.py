"""Fakes and a throwaway PKI for the API's unit tests (no Kafka, no PostgreSQL)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.api.app import Dependencies, create_app
from services.api.longpoll import CommandSignals
from services.api.models import AuditEntry
from services.api.repository import (
    AuditRecord,
    EnvironmentRow,
    EventStatus,
    PendingCommands,
)
from services.api.revocation_watch import RevocationWatch
from services.api.service import KafkaHeaders
from services.api.settings import ApiSettings
from services.gateway_auth.ca import CertificateAuthority
from services.shared.certificate_check import IssuerRecord
from services.shared.commands import Command
from services.shared.identity import AgentIdentity
from services.shared.operator_auth import StoredOperatorKey
from services.shared.operator_keys import NewKey, new_key
from services.shared.revocations import TrustState
from services.shared.settings import DatabaseSettings, KafkaSettings
from services.shared.web.tls import server_ssl_context

EDGE_CN = "fleetplane-edge"


def audit_row(*values: Any) -> AuditRecord:
    """An audit row as the repository answers it: the columns of ``AuditEntry``, in order."""
    return AuditEntry(**dict(zip(AuditEntry.model_fields, values, strict=True)))


@dataclass
class SentRecord:
    topic: str
    key: bytes
    value: bytes
    headers: KafkaHeaders


@dataclass
class FakeProducer:
    """A RecordProducer whose broker acknowledges, fails or never answers on demand.

    ``on_send``: "ack" resolves each batch's future, "fail" fails it with a
    KafkaError, "hang" leaves it pending; ``fail_index`` fails only the batch
    holding that record (counted over everything sent); ``batch_records`` splits a
    call's values into batches of at most that many, as a full batch does.
    ``send_error`` makes send_batch() itself raise; ``send_blocks`` makes it block
    (as aiokafka does while metadata is missing). ``futures`` are the batches' own
    futures; callers get shielded ones, as from aiokafka.
    """

    on_send: str = "ack"
    send_error: BaseException | None = None
    send_blocks: bool = False
    fail_index: int | None = None
    batch_records: int = 1000
    reachable: bool = True
    sent: list[SentRecord] = field(default_factory=list)
    futures: list[asyncio.Future[Any]] = field(default_factory=list)
    batches: list[list[SentRecord]] = field(default_factory=list)
    queued: asyncio.Event = field(default_factory=asyncio.Event)

    async def send_batch(
        self, topic: str, *, key: bytes, values: Sequence[bytes], headers: KafkaHeaders
    ) -> list[asyncio.Future[Any]]:
        if self.send_blocks:
            await asyncio.Event().wait()
        if self.send_error is not None:
            raise self.send_error
        shielded: list[asyncio.Future[Any]] = []
        for start in range(0, len(values), self.batch_records):
            first = len(self.sent)
            batch = [
                SentRecord(topic, key, value, list(headers))
                for value in values[start : start + self.batch_records]
            ]
            self.sent.extend(batch)
            self.batches.append(batch)
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            if self.fail_index is not None and first <= self.fail_index < len(self.sent):
                future.set_exception(KafkaConnectionError("connection lost"))
            elif self.on_send == "ack":
                future.set_result(None)
            elif self.on_send == "fail":
                future.set_exception(KafkaTimeoutError("no ack"))
            self.futures.append(future)
            shielded.append(asyncio.shield(future))
        self.queued.set()
        return shielded

    async def check(self, topic: str, timeout_s: float) -> None:
        if not self.reachable:
            raise KafkaConnectionError("broker down")


@dataclass
class FakeRepository:
    """A FleetRepository over dicts: event records keyed by (customer, environment, agent,
    event id), commands and environments by (customer, environment), audit by customer,
    operator keys by id (only active ones).

    ``error`` makes every read raise it; ``command_queries`` counts pending-command reads.
    """

    records: dict[tuple[str, str, str, str], EventStatus] = field(default_factory=dict)
    commands: dict[tuple[str, str], list[Command]] = field(default_factory=dict)
    next_due_in_s: dict[tuple[str, str], float] = field(default_factory=dict)
    due_for_s: dict[tuple[str, str], tuple[float, ...]] = field(default_factory=dict)
    environment_rows: dict[str, list[EnvironmentRow]] = field(default_factory=dict)
    audit_rows: dict[str, list[AuditRecord]] = field(default_factory=dict)
    keys: dict[str, StoredOperatorKey] = field(default_factory=dict)
    issuers: dict[str, IssuerRecord] = field(default_factory=dict)
    certificates: dict[str, dt.datetime] = field(default_factory=dict)
    """Issue time by normalised serial: gateway_auth's record of the certificates it issued."""
    error: BaseException | None = None
    reachable: bool = True
    calls: list[tuple[AgentIdentity, str]] = field(default_factory=list)
    command_queries: list[tuple[str, str]] = field(default_factory=list)
    key_lookups: list[str] = field(default_factory=list)
    pool: dict[str, int] = field(default_factory=lambda: {"in_use": 1, "idle": 2, "max": 10})

    def add_key(self, customer_id: str | None) -> NewKey:
        """Store a new operator key scoped to ``customer_id`` (None: all); returns its token."""
        key = new_key()
        self.keys[key.key_id] = StoredOperatorKey(key.key_id, key.secret_sha256, customer_id)
        return key

    def _fail(self) -> None:
        if self.error is not None:
            raise self.error

    async def event_status(self, identity: AgentIdentity, event_id: str) -> EventStatus | None:
        self.calls.append((identity, event_id))
        self._fail()
        key = (identity.customer_id, identity.environment_id, identity.agent_id, event_id)
        return self.records.get(key)

    async def pending_commands(self, customer_id: str, environment_id: str) -> PendingCommands:
        self.command_queries.append((customer_id, environment_id))
        self._fail()
        key = (customer_id, environment_id)
        return PendingCommands(
            list(self.commands.get(key, [])),
            self.next_due_in_s.get(key),
            self.due_for_s.get(key, ()),
        )

    async def environments(self, customer_id: str) -> list[EnvironmentRow]:
        self._fail()
        return list(self.environment_rows.get(customer_id, []))

    async def audit(self, customer_id: str, *, limit: int) -> list[AuditRecord]:
        self._fail()
        return self.audit_rows.get(customer_id, [])[:limit]

    async def operator_key(self, key_id: str) -> StoredOperatorKey | None:
        self.key_lookups.append(key_id)
        self._fail()
        return self.keys.get(key_id)

    async def issuer(self, subject_dn: str) -> IssuerRecord | None:
        self._fail()
        return self.issuers.get(subject_dn)

    async def certificate_issued_at(self, serial: str) -> dt.datetime | None:
        self._fail()
        return self.certificates.get(serial)

    async def ping(self) -> None:
        if not self.reachable:
            raise OSError("database down")

    def pool_use(self) -> dict[str, int]:
        return dict(self.pool)


def fake_dependencies(producer: FakeProducer, repository: FakeRepository) -> Dependencies:
    @asynccontextmanager
    async def producer_factory(settings: ApiSettings) -> AsyncIterator[FakeProducer]:
        yield producer

    @asynccontextmanager
    async def repository_factory(settings: ApiSettings) -> AsyncIterator[FakeRepository]:
        yield repository

    @asynccontextmanager
    async def no_follower(
        settings: ApiSettings, signals: CommandSignals, watch: RevocationWatch
    ) -> AsyncIterator[None]:
        # Tests wake polls through app[SIGNALS] and revoke through app[WATCH]
        # themselves; the state trusts the issuing CA of AGENT's certificate.
        watch.update(TrustState(issuers={AGENT_ISSUER_DN: None}))
        yield

    return Dependencies(
        producer=producer_factory, repository=repository_factory, follower=no_follower
    )


# --- PKI ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: Path

    def client_context(self, name: str | None) -> ssl.SSLContext:
        """A client context trusting the test CA, presenting ``<name>.pem`` if given."""
        context = ssl.create_default_context(cafile=self.ca)
        if name is not None:
            context.load_cert_chain(self.folder / f"{name}.pem", self.folder / f"{name}.key")
        return context


def _name(common_name: str, **attributes: str) -> x509.Name:
    oids = {"O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME}
    parts = [x509.NameAttribute(oids[key], value) for key, value in attributes.items()]
    return x509.Name([*parts, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    folder: Path,
    file_name: str,
    subject: x509.Name,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> tuple[x509.Name, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    certificate = builder.sign(issuer_key, hashes.SHA256())
    (folder / f"{file_name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / f"{file_name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return subject, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """internal-ca issues api-server, edge-client (CN=fleetplane-edge) and other-service;
    a foreign CA issues an edge-named impostor."""
    folder = tmp_path_factory.mktemp("pki")
    internal = _issue(folder, "internal-ca", _name("Test Internal CA", O="Test"), None, ca=True)
    _issue(folder, "api-server", _name("localhost", O="Test"), internal, server=True)
    _issue(folder, "edge-client", _name(EDGE_CN, O="Test"), internal)
    _issue(folder, "other-service", _name("fleetplane-controller", O="Test"), internal)
    foreign = _issue(folder, "foreign-ca", _name("Foreign CA", O="Evil"), None, ca=True)
    _issue(folder, "impostor-edge", _name(EDGE_CN, O="Evil"), foreign)
    return Pki(folder, folder / "internal-ca.pem")


@pytest.fixture
def settings(pki: Pki) -> ApiSettings:
    return ApiSettings(
        database=DatabaseSettings(),
        kafka=KafkaSettings(events_topic="test.events"),
        tls_cert=pki.folder / "api-server.pem",
        tls_key=pki.folder / "api-server.key",
        edge_ca=pki.ca,
        edge_client_cn=EDGE_CN,
        produce_timeout_s=0.3,
        retry_after_s=7,
        max_body_bytes=64 * 1024,
        operator_key_cache_s=0,
    )


Client = TestClient[web.Request, web.Application]


@asynccontextmanager
async def serve(
    settings: ApiSettings,
    producer: FakeProducer,
    repository: FakeRepository,
    client_ssl: ssl.SSLContext,
) -> AsyncIterator[Client]:
    """The app over real TLS on 127.0.0.1, and a client with the given TLS identity.

    ``client.app`` is the running app (``client.app[SIGNALS]`` wakes polls).
    """
    app = create_app(settings, dependencies=fake_dependencies(producer, repository))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(
        ssl=server_ssl_context(settings.tls_cert, settings.tls_key, settings.edge_ca)
    )
    client: Client = TestClient(server, connector=aiohttp.TCPConnector(ssl=client_ssl))
    async with client:
        yield client


# --- requests through the app ---------------------------------------------------


def _agent_certificate() -> tuple[str, x509.Certificate]:
    """acme/prod/agent-1's certificate from a throwaway issuing CA: (its issuer DN, it)."""
    root = CertificateAuthority.create_root("Test Root CA", path_length=1)
    issuing = root.create_intermediate("Test Issuing CA", permitted_uri_hosts=["fleetplane"])
    issued = issuing.issue_agent("acme", "prod", "agent-1")
    return (
        issuing.certificate.subject.rfc4514_string(),
        x509.load_pem_x509_certificate(issued.certificate_pem),
    )


AGENT_ISSUER_DN, AGENT_CERTIFICATE = _agent_certificate()
AGENT_LISTENER = {"X-Fleetplane-Listener": "agent"}
AGENT = {
    **AGENT_LISTENER,
    "X-Fleetplane-Client-DN": "CN=agent-1,OU=prod,O=acme",
    "X-Fleetplane-Client-Verify": "SUCCESS",
    # What nginx forwards of the certificate it verified: serial in upper-case hex,
    # issuer DN, and the certificate itself (URL-encoded PEM).
    "X-Fleetplane-Client-Serial": format(AGENT_CERTIFICATE.serial_number, "X"),
    "X-Fleetplane-Client-Issuer-DN": AGENT_ISSUER_DN,
    "X-Fleetplane-Client-Cert": quote(
        AGENT_CERTIFICATE.public_bytes(serialization.Encoding.PEM).decode(), safe=""
    ),
}
OPERATOR_LISTENER = {"X-Fleetplane-Listener": "operator"}
JSON = {"Content-Type": "application/json"}
PROBLEM = "application/problem+json"


def operator(key: NewKey) -> dict[str, str]:
    """Headers of an operator request through the edge's operator listener."""
    return {**OPERATOR_LISTENER, "Authorization": f"Bearer {key.token}"}


@pytest.fixture
def producer() -> FakeProducer:
    return FakeProducer()


@pytest.fixture
def repository() -> FakeRepository:
    return FakeRepository()


@pytest.fixture
async def edge(
    settings: ApiSettings, pki: Pki, producer: FakeProducer, repository: FakeRepository
) -> AsyncIterator[Client]:
    """A client holding the edge's client certificate."""
    async with serve(settings, producer, repository, pki.client_context("edge-client")) as client:
        yield client


async def problem(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """The problem body of ``response``, after checking it is a well-formed problem."""
    assert response.status == status, await response.text()
    assert response.content_type == PROBLEM
    body: dict[str, Any] = await response.json(content_type=PROBLEM)
    assert body["status"] == status
    assert body["type"].startswith("urn:fleetplane:problem:")
    assert body["title"]
    assert body["detail"]
    assert body["request_id"] == response.headers["X-Request-Id"]
    return body

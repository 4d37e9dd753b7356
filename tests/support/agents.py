"""A test agent: speaks to the edge over mutual TLS with its own certificate."""

from __future__ import annotations

import itertools
import ssl
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from services.gateway_auth.ca import CertificateAuthority
from services.gateway_auth.pki import write_agent_certificate


def agent_ssl_context(pki_dir: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki_dir / "root-ca.pem"))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


@dataclass
class AgentClient:
    """One simulated agent with a boot id and a sequence counter."""

    customer_id: str
    environment_id: str
    agent_id: str
    edge_url: str
    ssl_context: ssl.SSLContext
    boot_id: str = field(default_factory=lambda: f"boot-{uuid.uuid4().hex[:12]}")
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    session: aiohttp.ClientSession | None = None

    @classmethod
    def issue(
        cls,
        ca: CertificateAuthority,
        pki_dir: Path,
        edge_url: str,
        identity: tuple[str, str, str],
        out_dir: Path,
    ) -> AgentClient:
        customer, env, agent = identity
        cert, key = write_agent_certificate(ca, out_dir, customer, env, agent)
        return cls(customer, env, agent, edge_url, agent_ssl_context(pki_dir, cert, key))

    def open(self) -> AgentClient:
        """Create the HTTP session; call from a running event loop."""
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ssl_context, limit=4),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        return self

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def reboot(self) -> str:
        """Start a new boot: a fresh boot id, sequence from 1. Returns the boot id left."""
        left = self.boot_id
        self.boot_id = f"boot-{uuid.uuid4().hex[:12]}"
        self._seq = itertools.count(1)
        return left

    def heartbeat(self, health: str = "ok", message: str = "") -> dict[str, Any]:
        return self._event(
            "heartbeat", {"agent_version": "1.4.2", "health": health, "message": message}
        )

    def observed(self, resources: list[dict[str, str]]) -> dict[str, Any]:
        return self._event("observed_state", {"resources": resources})

    def command_result(
        self, command_id: int, epoch: int, outcome: str = "succeeded"
    ) -> dict[str, Any]:
        return self._event(
            "command_result", {"command_id": command_id, "epoch": epoch, "outcome": outcome}
        )

    def _event(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": f"ev-{uuid.uuid4().hex}",
            "boot_id": self.boot_id,
            "seq": next(self._seq),
            "type": kind,
            "payload": payload,
        }

    async def post_events(
        self, events: list[dict[str, Any]], headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        assert self.session is not None
        async with self.session.post(
            f"{self.edge_url}/v1/events", json={"events": events}, headers=headers
        ) as reply:
            return reply.status, await reply.json(content_type=None)

    async def post_raw(
        self, body: bytes, content_type: str = "application/json"
    ) -> tuple[int, dict[str, Any], str]:
        assert self.session is not None
        async with self.session.post(
            f"{self.edge_url}/v1/events", data=body, headers={"Content-Type": content_type}
        ) as reply:
            return reply.status, await reply.json(content_type=None), reply.content_type

    async def poll_commands(self, wait_s: int) -> tuple[int, dict[str, Any]]:
        assert self.session is not None
        async with self.session.get(
            f"{self.edge_url}/v1/commands", params={"wait": str(wait_s)}
        ) as reply:
            return reply.status, await reply.json(content_type=None)

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        assert self.session is not None
        async with self.session.get(f"{self.edge_url}{path}") as reply:
            return reply.status, await reply.json(content_type=None)

    async def event_status(self, event_id: str) -> tuple[int, dict[str, Any]]:
        assert self.session is not None
        async with self.session.get(f"{self.edge_url}/v1/events/{event_id}") as reply:
            return reply.status, await reply.json(content_type=None)

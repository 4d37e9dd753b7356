"""The one seam between agent logic and the network: a request in, a Reply out.

Agent code talks to a ``Transport``; ``HttpTransport`` is the mTLS aiohttp one,
and tests pass fakes. Network failures surface as the exceptions listed in
``NETWORK_ERRORS`` so the callers can treat them as transient.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import aiohttp

NETWORK_ERRORS: Final = (aiohttp.ClientError, TimeoutError, OSError)
CONNECTIONS_PER_AGENT: Final = 4
"""A long poll, a POST and a status probe at once, plus one spare: a real agent
keeps a handful of connections, not a pool."""
RETIRE_AFTER_S: Final = 60.0
"""After a certificate change, how long the old connections may finish their requests
(longer than any long poll)."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    retry_after: str | None = None


class Transport(Protocol):
    async def request(
        self, method: str, path: str, *, body: bytes | None = None, timeout_s: float
    ) -> Reply:
        """Send one request; raise one of NETWORK_ERRORS when no answer came."""
        ...


def agent_ssl_context(root_ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Verify the edge against the agents' root only, and present the agent certificate."""
    context = ssl.create_default_context(cafile=str(root_ca))
    context.load_cert_chain(str(cert), str(key))
    return context


class HttpTransport:
    """One agent's keep-alive session to the edge. Create inside a running loop."""

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None) -> None:
        self._base_url = base_url.rstrip("/")
        self._session = self._new_session(ssl_context)
        self._retired: list[aiohttp.ClientSession] = []

    @staticmethod
    def _new_session(ssl_context: ssl.SSLContext | None) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                ssl=ssl_context if ssl_context is not None else True,
                limit=CONNECTIONS_PER_AGENT,
            ),
            # Per-request timeouts are passed with each call; this only bounds
            # connection set-up, which a loaded edge can make slow.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )

    def use_context(self, ssl_context: ssl.SSLContext) -> None:
        """Present another certificate on every new request (after a renewal).

        Requests in flight finish on the old connections, which are closed after
        RETIRE_AFTER_S (or by ``close``). Call from the running loop.
        """
        old, self._session = self._session, self._new_session(ssl_context)
        self._retired.append(old)
        asyncio.get_running_loop().call_later(
            RETIRE_AFTER_S, lambda: asyncio.ensure_future(old.close())
        )

    async def request(
        self, method: str, path: str, *, body: bytes | None = None, timeout_s: float
    ) -> Reply:
        headers = {"Content-Type": "application/json"} if body is not None else None
        async with self._session.request(
            method,
            f"{self._base_url}{path}",
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            return Reply(
                response.status, await response.read(), response.headers.get("Retry-After")
            )

    async def close(self) -> None:
        for session in [*self._retired, self._session]:
            await session.close()

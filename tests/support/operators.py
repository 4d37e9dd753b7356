"""A test operator: talks to the operator listener with a bearer key."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import aiohttp


class OperatorClient:
    def __init__(self, pki_dir: Path, key: str, base_url: str) -> None:
        self._context = ssl.create_default_context(cafile=str(pki_dir / "root-ca.pem"))
        self._headers = {"Authorization": f"Bearer {key}"}
        self._base = base_url

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._context)) as session,
            session.request(
                method, f"{self._base}{path}", json=body, headers=self._headers
            ) as reply,
        ):
            return reply.status, await reply.json(content_type=None)

    async def request_raw(
        self, method: str, path: str, body: bytes, content_type: str = "application/json"
    ) -> tuple[int, dict[str, Any]]:
        """Like ``request``, with the body sent exactly as given."""
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._context)) as session,
            session.request(
                method,
                f"{self._base}{path}",
                data=body,
                headers={**self._headers, "Content-Type": content_type},
            ) as reply,
        ):
            return reply.status, await reply.json(content_type=None)

    async def set_desired(
        self, customer: str, environment: str, revision: int, resources: list[dict[str, str]]
    ) -> tuple[int, dict[str, Any]]:
        return await self.request(
            "PUT",
            f"/v1/operator/customers/{customer}/environments/{environment}/desired-state",
            {"revision": revision, "resources": resources},
        )

    async def environments(self, customer: str) -> tuple[int, dict[str, Any]]:
        return await self.request("GET", f"/v1/operator/customers/{customer}/environments")

"""HTTP/1.1 spoken byte by byte to the edge, for what aiohttp will not send or time.

aiohttp normalises requests (it always sends Host, refuses odd methods and
targets) and opens connections lazily, so a test cannot time a request apart
from its TLS handshake with it. ``RawConnection`` opens the TLS connection
first, then writes exactly the bytes a test gives it and reads one response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    """Lower-cased names; a repeated header keeps its last value."""
    body: bytes
    finished_at: float = field(default=0.0)
    """``time.monotonic()`` when the last byte of the body was read."""

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip()

    def json(self) -> Any:
        return json.loads(self.body)


class RawConnection:
    """One TLS connection to a listener of the edge; use as an async context manager."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext) -> RawConnection:
        """Connect and finish the TLS handshake (client certificate included)."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost", limit=1 << 20
        )
        return cls(reader, writer)

    async def __aenter__(self) -> RawConnection:
        return self

    async def __aexit__(self, *_: object) -> None:
        self._writer.close()
        # The edge may already have closed it after refusing the request.
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self._writer.wait_closed()

    def send(self, request: bytes) -> None:
        """Queue the request's bytes; they leave at the next await."""
        self._writer.write(request)

    async def response(self, timeout_s: float = 15.0) -> RawResponse:
        return await asyncio.wait_for(self._read_response(), timeout_s)

    async def exchange(self, request: bytes, timeout_s: float = 15.0) -> RawResponse:
        self.send(request)
        return await self.response(timeout_s)

    async def _read_response(self) -> RawResponse:
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self._reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        else:
            body = await self._reader.read()
        return RawResponse(status, headers, body, time.monotonic())

    async def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await self._reader.readexactly(size + 2)
            if size == 0:
                return b"".join(chunks)
            chunks.append(chunk[:-2])


def request_bytes(
    method: str,
    target: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    host: str | None = "localhost",
    version: str = "HTTP/1.1",
) -> bytes:
    """A request as it goes on the wire; ``host=None`` leaves the Host header out."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

"""The API's per-request certificate check, and ending open long polls it revokes.

Every agent request is checked against the trust state in memory
(``services.shared.certificate_check``), reloaded on the identity NOTIFY and on
a timer. A long poll that is already waiting passed its check when it started:
each waiting poll is remembered here, and a new state that revokes its
certificate wakes it, and it answers 403.

Plain asyncio, no aiohttp.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from services.shared.certificate_check import CertificateCheck
from services.shared.edge_auth import AgentCertificate
from services.shared.revocations import TrustState, load_trust_state


class RevocationWatch:
    """The certificate check with the trust state as last loaded, and the polls waiting under it."""

    def __init__(self, check: CertificateCheck | None = None) -> None:
        self.check = check or CertificateCheck()
        self._waiting: dict[int, tuple[AgentCertificate, asyncio.Event]] = {}

    @property
    def loaded(self) -> bool:
        return self.check.state is not None

    async def reload(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self.update(await load_trust_state(connection))

    def update(self, state: TrustState) -> None:
        """Adopt a new state and wake the waiting polls it revokes."""
        self.check.state = state
        for certificate, revoked in self._waiting.values():
            if not revoked.is_set() and self.check.revoked_at(certificate) is not None:
                revoked.set()

    @contextmanager
    def watch(self, certificate: AgentCertificate) -> Iterator[asyncio.Event]:
        """An event set as soon as a loaded state revokes the certificate, for the block."""
        revoked = asyncio.Event()
        token = id(revoked)
        self._waiting[token] = (certificate, revoked)
        try:
            if self.check.revoked_at(certificate) is not None:
                revoked.set()
            yield revoked
        finally:
            del self._waiting[token]

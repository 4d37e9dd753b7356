"""Ending open long polls of revoked certificates, without restarting anything.

The edge checks every request with gateway_auth, but a long poll that is
already waiting made its check when it started. The API follows the same trust
state (``services.shared.revocations``, reloaded on NOTIFY) and wakes each
waiting poll whose certificate a new revocation covers, which then answers 403.

Plain asyncio, no aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from prometheus_client import Histogram

from services.shared.identity import AgentIdentity
from services.shared.revocations import TrustState, load_trust_state, normal_serial

log = logging.getLogger(__name__)


class RevocationWatch:
    """The trust state as last loaded, and the long polls waiting under it."""

    def __init__(
        self,
        delay: Histogram | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.state = TrustState()
        self._delay = delay
        self._clock = clock
        self._waiting: dict[int, tuple[AgentIdentity, str, asyncio.Event]] = {}

    async def reload(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self.update(await load_trust_state(connection))

    def update(self, state: TrustState) -> None:
        """Adopt a new state and wake the waiting polls it revokes."""
        self.state = state
        for identity, serial, revoked in self._waiting.values():
            if not revoked.is_set() and self._revoked_at(identity, serial) is not None:
                revoked.set()

    def _revoked_at(self, identity: AgentIdentity, serial: str) -> datetime | None:
        revocation = self.state.revocation_for(identity, serial)
        return None if revocation is None else revocation.revoked_at

    def refused(self, identity: AgentIdentity, serial: str | None) -> bool:
        """True when the current state revokes this certificate (unknown serial: identity only)."""
        return self._revoked_at(identity, _normal(serial)) is not None

    @contextmanager
    def watch(self, identity: AgentIdentity, serial: str | None) -> Iterator[asyncio.Event]:
        """An event set as soon as a loaded state revokes the certificate, for the block."""
        key = normal = _normal(serial)
        revoked = asyncio.Event()
        token = id(revoked)
        self._waiting[token] = (identity, key, revoked)
        try:
            if self._revoked_at(identity, normal) is not None:
                revoked.set()
            yield revoked
        finally:
            del self._waiting[token]

    def observe_refusal(self, identity: AgentIdentity, serial: str | None) -> None:
        """Record how long after its revocation a waiting poll was ended."""
        revoked_at = self._revoked_at(identity, _normal(serial))
        if revoked_at is None:
            return
        delay = (self._clock() - revoked_at).total_seconds()
        if self._delay is not None:
            self._delay.labels(where="longpoll").observe(max(delay, 0.0))
        log.info("ended the long poll of revoked %s %.3f s after revocation", identity, delay)


def _normal(serial: str | None) -> str:
    # Without a serial (a misconfigured edge) only the identity rule can match.
    if serial is None:
        return ""
    try:
        return normal_serial(serial)
    except ValueError:
        return ""

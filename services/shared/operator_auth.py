"""Operator keys at the door: verifying a presented key and the customers it may act on.

Shared by the API and gateway_auth, whose operator routes take the same keys.
``services.shared.edge_auth.operator_credentials_from_request`` extracts the
presented key; ``OperatorAuthenticator`` checks it against the stored keys.

Scope rule: a key whose ``customer_id`` is NULL may act on every customer;
otherwise only on that one. A request for any other customer is answered 404
"no such customer", the same answer whether or not that customer exists, so a
scoped key learns nothing about other customers (never 403, which would confirm
that the path names something).

Plain asyncio, no aiohttp and no database driver.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from services.shared.edge_auth import OperatorCredentials
from services.shared.operator_keys import secret_matches
from services.shared.problems import NotFound, OperatorUnauthenticated

MAX_CACHED_KEYS: Final = 10_000
"""Bounds the cache so a flood of distinct valid-looking keys cannot grow memory."""


@dataclass(frozen=True, slots=True)
class StoredOperatorKey:
    """An operator key that is not revoked, as stored (only its secret's hash)."""

    key_id: str
    secret_sha256: bytes
    customer_id: str | None
    """None: the key may act on every customer."""


class OperatorKeyLookup(Protocol):
    """Where keys are stored (the repository in production)."""

    async def operator_key(self, key_id: str) -> StoredOperatorKey | None:
        """The key with this id unless it is unknown or revoked; raises if the store is down."""
        ...


@dataclass(frozen=True, slots=True)
class OperatorKey:
    """A verified operator key and the customers it may act on."""

    key_id: str
    customer_id: str | None
    """None: every customer."""

    def may_act_on(self, customer_id: str) -> bool:
        return self.customer_id is None or self.customer_id == customer_id

    def require_customer(self, customer_id: str) -> None:
        """Raise NotFound unless this key may act on ``customer_id`` (see the module doc)."""
        if not self.may_act_on(customer_id):
            raise NotFound("no such customer")


class OperatorAuthenticator:
    """Verifies presented keys, reusing a looked-up key for up to ``cache_s`` seconds.

    Only keys that were found (and not revoked) are cached, so a new key works at
    once and a revoked one stops working within ``cache_s`` on every instance.
    The secret is checked on every request, cached or not.
    """

    def __init__(
        self,
        keys: OperatorKeyLookup,
        *,
        cache_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_CACHED_KEYS,
    ) -> None:
        self._keys = keys
        self._cache_s = cache_s
        self._clock = clock
        self._max_entries = max_entries
        self._cache: dict[str, tuple[float, StoredOperatorKey]] = {}

    async def authenticate(self, credentials: OperatorCredentials) -> OperatorKey:
        """The verified key; raises OperatorUnauthenticated for an unknown, revoked or wrong key.

        Errors of the key store (database down) propagate unchanged.
        """
        stored = await self._stored(credentials.key_id)
        if stored is None or not secret_matches(credentials.secret, stored.secret_sha256):
            # One answer for all three cases: no hint which part was wrong.
            raise OperatorUnauthenticated("the operator key is unknown, revoked or wrong")
        return OperatorKey(stored.key_id, stored.customer_id)

    async def _stored(self, key_id: str) -> StoredOperatorKey | None:
        now = self._clock()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[0] < self._cache_s:
            return cached[1]
        stored = await self._keys.operator_key(key_id)
        self._cache.pop(key_id, None)
        if stored is not None and self._cache_s > 0:
            if len(self._cache) >= self._max_entries:
                self._evict(now)
            self._cache[key_id] = (now, stored)
        return stored

    def _evict(self, now: float) -> None:
        expired = [k for k, (at, _) in self._cache.items() if now - at >= self._cache_s]
        for key_id in expired:
            del self._cache[key_id]
        while len(self._cache) >= self._max_entries:
            # Insertion order is lookup order: drop the oldest.
            del self._cache[next(iter(self._cache))]

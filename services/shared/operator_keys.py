"""Operator API keys: the token format and how secrets are stored.

A key is ``fpk_<key id>_<secret>``: the id (12 hex digits) finds the row, the
secret (256 random bits) proves possession. Only SHA-256 of the secret is
stored; a fast hash is enough because the secret is random, not a password.
``python -m services.gateway_auth.operator_keys`` creates and revokes keys; the API and
gateway_auth each verify them for their operator routes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Final

_TOKEN: Final = re.compile(r"^fpk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


class MalformedKeyError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    token: str
    """Shown once to whoever created the key; never stored."""
    secret_sha256: bytes


def new_key() -> NewKey:
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return NewKey(key_id, f"fpk_{key_id}_{secret}", hash_secret(secret))


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_token(token: str) -> tuple[str, str]:
    """(key id, secret); raises MalformedKeyError without echoing the token."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise MalformedKeyError("an operator key looks like fpk_<12 hex>_<43 characters>")
    return match.group(1), match.group(2)


def secret_matches(secret: str, stored_sha256: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_sha256)

"""Replaying the identity journal into a restored database.

The backup holds gateway_auth's tables as they were at its snapshot; the journal
(services/shared/identity_journal.py) holds every identity change since the
journal began. Applying all of it, idempotently, brings back the changes made
after the backup: revocations, certificates, consumed enrollment tokens, issuing
CAs and their retirement, operator keys and their revocation. Entries the
restored database already has change nothing.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Final

import psycopg

from services.shared.identity_journal import read_all
from services.shared.revocations import IDENTITY_CHANNEL

_APPLY: Final[dict[str, str]] = {
    "revocation": (
        "INSERT INTO revocations (customer_id, environment_id, agent_id, revoked_at, "
        "revoked_by, reason) SELECT %(customer_id)s, %(environment_id)s, %(agent_id)s, "
        "%(revoked_at)s, %(revoked_by)s, %(reason)s WHERE NOT EXISTS (SELECT 1 FROM "
        "revocations WHERE customer_id = %(customer_id)s AND environment_id = "
        "%(environment_id)s AND agent_id IS NOT DISTINCT FROM %(agent_id)s AND revoked_at = "
        "%(revoked_at)s)"
    ),
    "certificate": (
        "INSERT INTO agent_certificates (serial, customer_id, environment_id, agent_id, "
        "issuer_dn, not_after, issued_at, via, previous_serial) VALUES (%(serial)s, "
        "%(customer_id)s, %(environment_id)s, %(agent_id)s, %(issuer_dn)s, %(not_after)s, "
        "%(issued_at)s, %(via)s, %(previous_serial)s) ON CONFLICT (serial) DO NOTHING"
    ),
    "token_used": (
        "UPDATE enrollment_tokens SET used_at = %(used_at)s, used_by_serial = "
        "%(used_by_serial)s WHERE token_sha256 = %(token_sha256)s AND used_at IS NULL"
    ),
    "issuer": (
        "INSERT INTO issuing_cas (subject_dn, certificate_pem, added_at) VALUES "
        "(%(subject_dn)s, %(certificate_pem)s, %(added_at)s) ON CONFLICT (subject_dn) DO NOTHING"
    ),
    "issuer_retired": (
        "UPDATE issuing_cas SET retire_at = %(retire_at)s WHERE subject_dn = %(subject_dn)s"
    ),
    "operator_key": (
        "INSERT INTO operator_keys (key_id, name, secret_sha256, customer_id, created_at) "
        "VALUES (%(key_id)s, %(name)s, %(secret_sha256)s, %(customer_id)s, %(created_at)s) "
        "ON CONFLICT (key_id) DO NOTHING"
    ),
    "operator_key_revoked": (
        "UPDATE operator_keys SET revoked_at = %(revoked_at)s WHERE key_id = %(key_id)s "
        "AND revoked_at IS NULL"
    ),
}
_BYTES: Final = {"token_sha256", "secret_sha256"}


class UnknownEntry(Exception):
    pass


def read_journal(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every journal entry; raises JournalUnavailable when Kafka or the topic is missing."""
    entries = asyncio.run(read_all(bootstrap, topic))
    unknown = {e.get("kind") for e in entries} - set(_APPLY)
    if unknown:
        raise UnknownEntry(f"identity journal has entries this release does not know: {unknown}")
    return entries


def apply(dsn: str, entries: list[dict[str, Any]]) -> Counter[str]:
    """Apply every entry in order, in one transaction; counts the entries that changed rows."""
    changed: Counter[str] = Counter()
    with psycopg.connect(dsn) as conn:
        for entry in entries:
            row = {
                k: bytes.fromhex(v) if k in _BYTES and v is not None else v
                for k, v in entry["row"].items()
            }
            if conn.execute(_APPLY[entry["kind"]], row).rowcount:
                changed[entry["kind"]] += 1
        # gateway_auth and the API follow these tables by NOTIFY; restarted
        # services read them afresh anyway.
        conn.execute("SELECT pg_notify(%s, 'restore')", (IDENTITY_CHANNEL,))
    return changed

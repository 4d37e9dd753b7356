"""``python -m services.gateway_auth.operator_keys``: create, list and revoke operator keys.

A key is scoped to one customer (``--customer``) or to all (``--all-customers``).
The token is printed once; only a hash of its secret is kept.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sqlalchemy import func, select

from services.shared.db import sync_transaction
from services.shared.identity_journal import JournalUnavailable, append_from_tool, stamp_from_tool
from services.shared.operator_keys import new_key
from services.shared.schema import operator_keys
from services.shared.settings import DatabaseSettings, KafkaSettings


def create(dsn: str, name: str, customer_id: str | None, kafka: KafkaSettings | None = None) -> str:
    """Store a new key and return its token.

    With ``kafka``, the key is also appended to the identity journal before the
    commit, so a restore of an older backup brings it back.
    """
    key = new_key()
    row = {
        "key_id": key.key_id,
        "name": name,
        "secret_sha256": key.secret_sha256,
        "customer_id": customer_id,
    }
    statement = operator_keys.insert().values(row).returning(operator_keys.c.created_at)
    with sync_transaction(dsn) as conn:
        created_at = conn.execute(statement).scalar_one()
        append_from_tool(kafka, "operator_key", key.key_id, row | {"created_at": created_at})
    return key.token


def revoke(dsn: str, key_id: str, kafka: KafkaSettings | None = None) -> bool:
    """Revoke a key; with ``kafka``, journaled before the commit (see ``create``)."""
    k = operator_keys.c
    with sync_transaction(dsn) as conn:
        return stamp_from_tool(
            conn,
            kafka,
            "operator_key_revoked",
            (k.key_id, key_id),
            (k.revoked_at, func.now()),
            k.revoked_at.is_(None),
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway_auth.operator_keys")
    verbs = parser.add_subparsers(dest="verb", required=True)
    make = verbs.add_parser("create", help="create a key and print its token once")
    make.add_argument("--name", required=True, help="who or what uses the key")
    scope = make.add_mutually_exclusive_group(required=True)
    scope.add_argument("--customer", help="the one customer the key may act on")
    scope.add_argument("--all-customers", action="store_true", help="a key for every customer")
    verbs.add_parser("list", help="list keys (never their secrets)")
    drop = verbs.add_parser("revoke", help="revoke a key by id")
    drop.add_argument("key_id")
    args = parser.parse_args(argv)

    dsn = DatabaseSettings().libpq_dsn
    kafka = KafkaSettings()
    try:
        return _run(args, dsn, kafka)
    except JournalUnavailable as e:
        print(f"nothing changed: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, dsn: str, kafka: KafkaSettings) -> int:
    if args.verb == "create":
        print(create(dsn, args.name, None if args.all_customers else args.customer, kafka))
    elif args.verb == "list":
        k = operator_keys.c
        listing = select(
            k.key_id, k.name, func.coalesce(k.customer_id, "*"), k.created_at, k.revoked_at
        ).order_by(k.created_at)
        with sync_transaction(dsn) as conn:
            for row in conn.execute(listing):
                print("\t".join("" if v is None else str(v) for v in row))
    elif not revoke(dsn, args.key_id, kafka):
        print(f"no active key {args.key_id}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

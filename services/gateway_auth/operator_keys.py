"""``python -m services.gateway_auth.operator_keys``: create, list and revoke operator keys.

A key is scoped to one customer (``--customer``) or to all (``--all-customers``).
The token is printed once; only a hash of its secret is kept.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import psycopg

from services.shared.operator_keys import new_key
from services.shared.settings import DatabaseSettings


def create(dsn: str, name: str, customer_id: str | None) -> str:
    """Store a new key and return its token."""
    key = new_key()
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO operator_keys (key_id, name, secret_sha256, customer_id) "
            "VALUES (%s, %s, %s, %s)",
            (key.key_id, name, key.secret_sha256, customer_id),
        )
    return key.token


def revoke(dsn: str, key_id: str) -> bool:
    with psycopg.connect(dsn) as conn:
        cursor = conn.execute(
            "UPDATE operator_keys SET revoked_at = now() WHERE key_id = %s AND revoked_at IS NULL",
            (key_id,),
        )
        return cursor.rowcount == 1


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
    if args.verb == "create":
        print(create(dsn, args.name, None if args.all_customers else args.customer))
    elif args.verb == "list":
        with psycopg.connect(dsn) as conn:
            for row in conn.execute(
                "SELECT key_id, name, coalesce(customer_id, '*'), created_at, revoked_at "
                "FROM operator_keys ORDER BY created_at"
            ):
                print("\t".join("" if v is None else str(v) for v in row))
    elif not revoke(dsn, args.key_id):
        print(f"no active key {args.key_id}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

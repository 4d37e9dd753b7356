"""``python -m services.gateway_auth.issuers``: list issuing CAs, close a rotation window.

CA rotation, step by step (docs/threat-model.md, "Agent identity lifecycle"):

1. ``python -m services.gateway_auth.pki rotate-issuing --dir <pki> --offline-dir <offline>``
   signs a new issuing CA with the offline root; gateway_auth picks up the new
   files at its next issuance and registers the new CA as trusted.
2. ``python -m services.gateway_auth.issuers retire --subject '<old DN>' --in 172800``
   keeps the old CA trusted for the window (agents renew into the new one
   meanwhile), after which the edge refuses its certificates. No nginx reload.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import func, select

from services.shared.channels import IDENTITY_CHANNEL
from services.shared.db import sync_transaction
from services.shared.identity_journal import JournalUnavailable, stamp_from_tool
from services.shared.schema import issuing_cas
from services.shared.settings import DatabaseSettings, KafkaSettings


def retire(dsn: str, subject_dn: str, after_s: float, kafka: KafkaSettings | None = None) -> bool:
    """Trust the issuing CA only ``after_s`` seconds more; False if it is not registered.

    With ``kafka``, the change is appended to the identity journal before the
    commit, so a restore of an older backup does not trust the CA again.
    """
    i = issuing_cas.c
    with sync_transaction(dsn) as conn:
        retire_at = func.now() + timedelta(seconds=after_s)
        retired = stamp_from_tool(
            conn, kafka, "issuer_retired", (i.subject_dn, subject_dn), (i.retire_at, retire_at)
        )
        conn.execute(select(func.pg_notify(IDENTITY_CHANNEL, "issuer")))
        return retired


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway_auth.issuers")
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="registered issuing CAs and when each stops being trusted")
    drop = verbs.add_parser("retire", help="end the trust in an issuing CA after a window")
    drop.add_argument("--subject", required=True, help="its subject DN, as `list` prints it")
    drop.add_argument("--in", dest="after_s", type=float, required=True, help="seconds from now")
    args = parser.parse_args(argv)
    dsn = DatabaseSettings().libpq_dsn
    if args.verb == "list":
        i = issuing_cas.c
        listing = select(i.subject_dn, i.added_at, i.retire_at).order_by(i.added_at)
        with sync_transaction(dsn) as conn:
            for dn, added_at, retire_at in conn.execute(listing):
                print(f"{dn}\tadded {added_at}\tretire {retire_at or '-'}")
        return 0
    try:
        retired = retire(dsn, args.subject, args.after_s, KafkaSettings())
    except JournalUnavailable as e:
        print(f"nothing changed: {e}", file=sys.stderr)
        return 1
    if not retired:
        print(f"no registered issuing CA {args.subject!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

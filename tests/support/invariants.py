"""The invariant checker: what the API accepted against what PostgreSQL holds.

- lost: an accepted event id with no event record;
- duplicated: an effect applied more than once; observed-state reports are counted
  in ``environments.observed_reports``, so a report applied twice shows there;
- out of order: within one agent (customer, environment, agent: one agent id may
  be enrolled in several environments, as different agents), records whose
  sequence numbers do not rise in the order they were applied, or events the
  controller had to reject as stale.

"The order they were applied" is the apply transaction's start (``applied_at``),
then partition and offset: one customer's records share a partition, where that
is offset order; after partitions were added, a customer's older records are in
its old partition and its newer ones in another, and only the time tells which
were applied first.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg


@dataclass
class Ledger:
    """Every event the API answered 202 for, in acceptance order."""

    accepted: list[tuple[str, str, str, str, int, str]] = field(default_factory=list)
    """(customer, environment, agent, event id, seq, type)"""

    def record(
        self, customer: str, environment: str, agent: str, events: list[dict[str, Any]]
    ) -> None:
        for e in events:
            self.accepted.append((customer, environment, agent, e["id"], e["seq"], e["type"]))

    def __len__(self) -> int:
        return len(self.accepted)


@dataclass(frozen=True)
class Report:
    accepted: int
    recorded: int
    lost: list[tuple[str, str, str, str]]
    duplicated: dict[tuple[str, str], int]
    out_of_order: list[str]

    @property
    def ok(self) -> bool:
        return not self.lost and not self.duplicated and not self.out_of_order


def check(ledger: Ledger, dsn: str) -> Report:
    with psycopg.connect(dsn) as conn:
        records = conn.execute(
            "SELECT customer_id, environment_id, agent_id, event_id, seq, boot_id, status, reason,"
            ' "offset" FROM event_records'
            ' ORDER BY customer_id, environment_id, agent_id, applied_at, partition, "offset"'
        ).fetchall()
        revisions = {
            (c, e): r
            for c, e, r in conn.execute(
                "SELECT customer_id, environment_id, observed_reports FROM environments"
            )
        }
    recorded_keys = {(c, env, a, e) for c, env, a, e, *_ in records}
    # An id sent twice (a retry) counts once.
    accepted_keys: dict[tuple[str, str, str, str], tuple[str, str, str, str, int, str]] = {}
    for entry in ledger.accepted:
        accepted_keys.setdefault(entry[:4], entry)
    lost = sorted(k for k in accepted_keys if k not in recorded_keys)

    observed_accepted: Counter[tuple[str, str]] = Counter(
        (c, env) for c, env, _a, _id, _s, kind in accepted_keys.values() if kind == "observed_state"
    )
    duplicated = {
        key: revisions.get(key, 0) - count
        for key, count in observed_accepted.items()
        if revisions.get(key, 0) > count
    }

    out_of_order: list[str] = []
    by_agent: dict[tuple[str, str, str], list[tuple[int, str, int]]] = defaultdict(list)
    for customer, env, agent, event_id, seq, boot, status, reason, offset in records:
        if status == "rejected" and reason and reason.startswith("stale sequence"):
            out_of_order.append(f"{customer}/{env}/{agent}/{event_id}: {reason}")
        by_agent[(customer, env, agent)].append((offset, boot, seq))
    for (customer, env, agent), rows in by_agent.items():
        for (_o1, boot1, seq1), (o2, boot2, seq2) in itertools.pairwise(rows):
            if boot1 == boot2 and seq2 <= seq1:
                out_of_order.append(
                    f"{customer}/{env}/{agent}: seq {seq2} at offset {o2} after {seq1}"
                )
    return Report(len(accepted_keys), len(records), lost, duplicated, out_of_order)

"""Agents keyed by their whole identity (customer, environment, agent); boots an agent left.

Enrollment names an agent within its environment, so ``agent-1`` may be enrolled in
``prod`` and in ``staging`` of one customer as two agents. Until now ``agent_status``
was keyed by (customer, agent) and ``event_records`` by (customer, agent, event id),
so two such agents shared one status row and one set of event ids.

Existing rows: both tables already carry ``environment_id`` (NOT NULL), and the old
keys are unique, so every row keeps its meaning under the wider key. What the old
key got wrong is repaired here:

- An agent id that appears in more than one environment of a customer shared one
  status row, overwritten by whichever agent wrote last (its ``last_heartbeat_at``
  could even be the other agent's). For each such agent the status is rebuilt from
  its own applied event records (its latest boot and sequence, its latest heartbeat)
  and a resync is requested (reason ``identity_split``): events of it may have been
  refused as stale or dropped as duplicates of the other's ids, and a full-state
  report is how the controller recovers what it missed. An agent whose records were
  all pruned by retention keeps the row it has, or gets none (its next event then
  counts as a new boot, which also requests a resync).
- ``previous_boots`` is filled for every agent from the boot ids of its recorded
  events first applied before its current boot, newest first, so a late event of
  a recent boot is recognised right after the upgrade.

The upgrade rebuilds both primary keys: each table is locked while its new key's
index is built (``event_records`` holds the rows of the retention window).

Events lost before the upgrade (answered 202, then taken for a duplicate of the other
agent's event id) are not in the database; the resync request is what recovers
their effect.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Agent ids seen in more than one environment of a customer, in either table.
_SPLIT_AGENTS = """
CREATE TEMPORARY TABLE split_agents ON COMMIT DROP AS
SELECT customer_id, agent_id FROM (
    SELECT customer_id, agent_id, environment_id FROM event_records
    UNION
    SELECT customer_id, agent_id, environment_id FROM agent_status
) AS identities
GROUP BY customer_id, agent_id
HAVING count(DISTINCT environment_id) > 1
"""

# Each split agent's own latest applied event, in apply order (the transaction's
# start, then offset), and its own latest heartbeat.
_REBUILD_SPLIT = """
INSERT INTO agent_status AS s (
    customer_id, environment_id, agent_id, boot_id, last_seq, last_event_at,
    last_heartbeat_at
)
SELECT DISTINCT ON (r.customer_id, r.environment_id, r.agent_id)
    r.customer_id, r.environment_id, r.agent_id, r.boot_id, r.seq, r.accepted_at,
    (SELECT max(h.accepted_at) FROM event_records AS h
      WHERE h.customer_id = r.customer_id AND h.environment_id = r.environment_id
        AND h.agent_id = r.agent_id AND h.status = 'applied'
        AND h.event_type = 'heartbeat')
FROM event_records AS r
JOIN split_agents AS x USING (customer_id, agent_id)
WHERE r.status = 'applied'
ORDER BY r.customer_id, r.environment_id, r.agent_id, r.applied_at DESC, r."offset" DESC
ON CONFLICT (customer_id, environment_id, agent_id) DO UPDATE SET
    boot_id = excluded.boot_id,
    last_seq = excluded.last_seq,
    last_event_at = excluded.last_event_at,
    last_heartbeat_at = excluded.last_heartbeat_at
"""

# A split agent whose records were all pruned keeps the row it has; it too may have
# missed events, so every split agent is asked for a full-state report.
_RESYNC_SPLIT = """
UPDATE agent_status AS s SET resync_requested_at = now(), resync_reason = 'identity_split'
FROM split_agents AS x
WHERE s.customer_id = x.customer_id AND s.agent_id = x.agent_id
"""

# The boots an agent has left are those first applied before its current boot was,
# newest first. Ordering by first appearance (not last) matters: the defect this
# revision fixes could move an agent back to an older boot, and its newer boot must
# then not count as one it left (its next event moves the agent forward again). 16 is
# services.controller.handlers.PREVIOUS_BOOTS_KEPT (a migration does not import
# service code: it must keep meaning what it meant when written).
_PREVIOUS_BOOTS = """
WITH boots AS (
    SELECT customer_id, environment_id, agent_id, boot_id,
           min(applied_at) AS first_applied, min("offset") AS first_offset
    FROM event_records
    GROUP BY customer_id, environment_id, agent_id, boot_id
), left_boots AS (
    SELECT b.customer_id, b.environment_id, b.agent_id,
           (array_agg(b.boot_id ORDER BY b.first_applied DESC, b.first_offset DESC))
               [1:16] AS boots
    FROM agent_status AS a
    JOIN boots AS cur
      ON cur.customer_id = a.customer_id AND cur.environment_id = a.environment_id
     AND cur.agent_id = a.agent_id AND cur.boot_id = a.boot_id
    JOIN boots AS b
      ON b.customer_id = a.customer_id AND b.environment_id = a.environment_id
     AND b.agent_id = a.agent_id
     AND (b.first_applied, b.first_offset) < (cur.first_applied, cur.first_offset)
    GROUP BY b.customer_id, b.environment_id, b.agent_id
)
UPDATE agent_status AS s SET previous_boots = l.boots
FROM left_boots AS l
WHERE s.customer_id = l.customer_id AND s.environment_id = l.environment_id
  AND s.agent_id = l.agent_id
"""


def upgrade() -> None:
    op.drop_constraint("event_records_pkey", "event_records", type_="primary")
    op.create_primary_key(
        "event_records_pkey",
        "event_records",
        ["customer_id", "environment_id", "agent_id", "event_id"],
    )
    op.add_column(
        "agent_status",
        sa.Column(
            "previous_boots",
            ARRAY(sa.Text),
            nullable=False,
            server_default=sa.text("'{}'::text[]"),
        ),
    )
    op.drop_constraint("agent_status_pkey", "agent_status", type_="primary")
    op.create_primary_key(
        "agent_status_pkey", "agent_status", ["customer_id", "environment_id", "agent_id"]
    )
    op.execute(_SPLIT_AGENTS)
    op.execute(_REBUILD_SPLIT)
    op.execute(_RESYNC_SPLIT)
    op.execute(_PREVIOUS_BOOTS)


def downgrade() -> None:
    # The narrower keys cannot hold two agents of one id: keep, per (customer, agent),
    # the status row and, per (customer, agent, event id), the record last written.
    op.execute(
        "DELETE FROM agent_status AS s USING agent_status AS t"
        " WHERE s.customer_id = t.customer_id AND s.agent_id = t.agent_id"
        " AND (s.last_event_at, s.environment_id) < (t.last_event_at, t.environment_id)"
    )
    op.execute(
        "DELETE FROM event_records AS s USING event_records AS t"
        " WHERE s.customer_id = t.customer_id AND s.agent_id = t.agent_id"
        " AND s.event_id = t.event_id"
        " AND (s.applied_at, s.environment_id) < (t.applied_at, t.environment_id)"
    )
    op.drop_constraint("agent_status_pkey", "agent_status", type_="primary")
    op.create_primary_key("agent_status_pkey", "agent_status", ["customer_id", "agent_id"])
    op.drop_column("agent_status", "previous_boots")
    op.drop_constraint("event_records_pkey", "event_records", type_="primary")
    op.create_primary_key(
        "event_records_pkey", "event_records", ["customer_id", "agent_id", "event_id"]
    )

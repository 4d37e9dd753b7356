"""Fleet state: partition ownership, environments, agents, event records, commands.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_now = sa.text("now()")


def upgrade() -> None:
    op.execute(sa.schema.CreateSequence(sa.Sequence("ownership_epoch_seq")))
    op.create_table(
        "partition_ownership",
        sa.Column("topic", sa.Text, primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("next_offset", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    )
    op.create_table(
        "environments",
        sa.Column("customer_id", sa.Text, primary_key=True),
        sa.Column("environment_id", sa.Text, primary_key=True),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True)),
        sa.Column("agent_version", sa.Text),
        sa.Column("health", sa.Text),
        sa.Column("observed_state", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("observed_revision", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("observed_at", sa.DateTime(timezone=True)),
        sa.Column("desired_state", JSONB),
        sa.Column("desired_revision", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    )
    op.create_table(
        "agent_status",
        sa.Column("customer_id", sa.Text, primary_key=True),
        sa.Column("agent_id", sa.Text, primary_key=True),
        sa.Column("environment_id", sa.Text, nullable=False),
        sa.Column("boot_id", sa.Text, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("last_event_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True)),
        sa.Column("resync_requested_at", sa.DateTime(timezone=True)),
        sa.Column("resync_reason", sa.Text),
    )
    op.create_table(
        "event_records",
        sa.Column("customer_id", sa.Text, primary_key=True),
        sa.Column("agent_id", sa.Text, primary_key=True),
        sa.Column("event_id", sa.Text, primary_key=True),
        sa.Column("environment_id", sa.Text, nullable=False),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("boot_id", sa.Text, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.CheckConstraint("status IN ('applied', 'rejected')", name="event_records_status"),
    )
    op.create_index("event_records_partition_offset", "event_records", ["partition", "offset"])
    op.create_index("event_records_applied_at", "event_records", ["applied_at"])
    op.create_table(
        "commands",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("environment_id", sa.Text, nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("resource_kind", sa.Text, nullable=False),
        sa.Column("resource_name", sa.Text, nullable=False),
        sa.Column("version", sa.Text),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'pending'")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("result_message", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.CheckConstraint("action IN ('create', 'update', 'delete')", name="commands_action"),
        sa.CheckConstraint(
            "status IN ('pending', 'succeeded', 'failed', 'timed_out', 'superseded')",
            name="commands_status",
        ),
    )
    op.create_index(
        "commands_environment_status", "commands", ["customer_id", "environment_id", "status"]
    )


def downgrade() -> None:
    for table in (
        "commands",
        "event_records",
        "agent_status",
        "environments",
        "partition_ownership",
    ):
        op.drop_table(table)
    op.execute(sa.schema.DropSequence(sa.Sequence("ownership_epoch_seq")))

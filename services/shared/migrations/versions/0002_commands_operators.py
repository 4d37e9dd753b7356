"""Desired state and commands: observed-report count, command scheduling, operator keys, audit.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_now = sa.text("now()")


def upgrade() -> None:
    # observed_revision now means "the desired revision the observed state
    # matches"; the number of reports applied moves to its own column.
    op.add_column(
        "environments",
        sa.Column("observed_reports", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    )
    op.execute(
        "UPDATE environments SET observed_reports = observed_revision, observed_revision = 0"
    )
    op.add_column("commands", sa.Column("partition", sa.Integer, nullable=False))
    op.add_column(
        "commands",
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    )
    op.add_column("commands", sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=False))
    op.create_index(
        "commands_one_pending_per_resource",
        "commands",
        ["customer_id", "environment_id", "resource_kind", "resource_name"],
        unique=True,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "commands_partition_pending",
        "commands",
        ["partition", "deadline_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_table(
        "operator_audit",
        sa.Column("change_id", sa.Text, primary_key=True),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("environment_id", sa.Text, nullable=False),
        sa.Column("operator", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("request_id", sa.Text),
        sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    )
    op.create_index("operator_audit_customer", "operator_audit", ["customer_id", "accepted_at"])
    # Owned by gateway_auth: operator API keys, stored as SHA-256 of a 256-bit secret.
    op.create_table(
        "operator_keys",
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("secret_sha256", sa.LargeBinary, nullable=False),
        sa.Column("customer_id", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    op.drop_table("operator_keys")
    op.drop_table("operator_audit")
    op.drop_index("commands_partition_pending", "commands")
    op.drop_index("commands_one_pending_per_resource", "commands")
    for column in ("deadline_at", "not_before", "partition"):
        op.drop_column("commands", column)
    op.execute("UPDATE environments SET observed_revision = observed_reports")
    op.drop_column("environments", "observed_reports")

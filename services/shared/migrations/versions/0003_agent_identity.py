"""Agent identity lifecycle (gateway_auth): enrollment tokens, certificates, revocations,
issuing CAs, and the identity audit trail.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_now = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "enrollment_tokens",
        sa.Column("token_sha256", sa.LargeBinary, primary_key=True),
        sa.Column("token_id", sa.Text, nullable=False, unique=True),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("environment_id", sa.Text, nullable=False),
        sa.Column("agent_id", sa.Text),
        sa.Column("created_by", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True)),
        sa.Column("used_by_serial", sa.Text),
    )
    op.create_table(
        "agent_certificates",
        sa.Column("serial", sa.Text, primary_key=True),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("environment_id", sa.Text, nullable=False),
        sa.Column("agent_id", sa.Text, nullable=False),
        sa.Column("issuer_dn", sa.Text, nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("via", sa.Text, nullable=False),
        sa.Column("previous_serial", sa.Text),
        sa.CheckConstraint("via IN ('enrollment', 'renewal')", name="agent_certificates_via"),
    )
    op.create_index(
        "agent_certificates_identity",
        "agent_certificates",
        ["customer_id", "environment_id", "agent_id"],
    )
    op.create_table(
        "revocations",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("environment_id", sa.Text, nullable=False),
        sa.Column("agent_id", sa.Text),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("revoked_by", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
    )
    op.create_index("revocations_scope", "revocations", ["customer_id", "environment_id"])
    op.create_table(
        "issuing_cas",
        sa.Column("subject_dn", sa.Text, primary_key=True),
        sa.Column("certificate_pem", sa.Text, nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("retire_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "identity_audit",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
        sa.Column("customer_id", sa.Text, nullable=False),
        sa.Column("environment_id", sa.Text, nullable=False),
        sa.Column("agent_id", sa.Text),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("serial", sa.Text),
        sa.Column("detail", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("request_id", sa.Text),
        sa.CheckConstraint(
            "action IN ('token_created', 'token_used', 'certificate_issued', "
            "'certificate_renewed', 'revoked')",
            name="identity_audit_action",
        ),
    )
    op.create_index("identity_audit_customer", "identity_audit", ["customer_id", "at"])


def downgrade() -> None:
    op.drop_table("identity_audit")
    op.drop_table("issuing_cas")
    op.drop_table("revocations")
    op.drop_table("agent_certificates")
    op.drop_table("enrollment_tokens")

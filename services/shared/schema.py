"""PostgreSQL tables, as SQLAlchemy Core metadata.

Fleet state (everything here but gateway_auth's tables: operator_keys,
enrollment_tokens, agent_certificates, revocations, issuing_cas and identity_audit)
has exactly one writer: the controller that owns the
customer's partition. The API only reads it. Alembic migrations under
``services/shared/migrations`` create these tables; this module must match them
(a test compares the two).
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Sequence,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

metadata: Final = MetaData()

# One global, strictly increasing source of owner epochs for every partition.
epoch_sequence: Final = Sequence("ownership_epoch_seq", metadata=metadata)

partition_ownership: Final = Table(
    "partition_ownership",
    metadata,
    Column("topic", Text, primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("epoch", BigInteger, nullable=False),
    Column("owner", Text, nullable=False),
    # Offset of the next record to apply: stored in the same transaction as the
    # effects of everything before it.
    Column("next_offset", BigInteger, nullable=False, server_default=text("0")),
    Column("assigned_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

environments: Final = Table(
    "environments",
    metadata,
    Column("customer_id", Text, primary_key=True),
    Column("environment_id", Text, primary_key=True),
    Column("last_heartbeat_at", DateTime(timezone=True)),
    Column("agent_version", Text),
    Column("health", Text),
    Column("observed_state", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    # The desired revision that the observed state matches (0: none yet).
    Column("observed_revision", BigInteger, nullable=False, server_default=text("0")),
    Column("observed_at", DateTime(timezone=True)),
    Column("observed_reports", BigInteger, nullable=False, server_default=text("0")),
    Column("desired_state", JSONB),
    Column("desired_revision", BigInteger, nullable=False, server_default=text("0")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Agents and their events are keyed by the whole identity (customer, environment,
# agent): enrollment names an agent within its environment, so one agent id may be
# enrolled in several environments of a customer as different agents (migration 0004).
agent_status: Final = Table(
    "agent_status",
    metadata,
    Column("customer_id", Text, nullable=False),
    Column("agent_id", Text, nullable=False),
    Column("environment_id", Text, nullable=False),
    Column("boot_id", Text, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("last_event_at", DateTime(timezone=True), nullable=False),
    Column("last_heartbeat_at", DateTime(timezone=True)),
    # Set when a new boot or a sequence gap was seen: the agent is asked for a
    # full-state report instead of the gap being dropped silently.
    Column("resync_requested_at", DateTime(timezone=True)),
    Column("resync_reason", Text),
    # Boot ids the agent has left, newest first (bounded by the controller): an
    # event of one of them is late and does not move the agent back.
    Column("previous_boots", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    PrimaryKeyConstraint("customer_id", "environment_id", "agent_id", name="agent_status_pkey"),
)

event_records: Final = Table(
    "event_records",
    metadata,
    Column("customer_id", Text, nullable=False),
    Column("agent_id", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("environment_id", Text, nullable=False),
    Column("event_type", Text, nullable=False),
    Column("boot_id", Text, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("status", Text, nullable=False),
    Column("reason", Text),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("accepted_at", DateTime(timezone=True), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The deduplication key: the agent's whole identity and its event id.
    PrimaryKeyConstraint(
        "customer_id", "environment_id", "agent_id", "event_id", name="event_records_pkey"
    ),
    CheckConstraint("status IN ('applied', 'rejected')", name="event_records_status"),
    Index("event_records_partition_offset", "partition", "offset"),
    Index("event_records_applied_at", "applied_at"),
)

commands: Final = Table(
    "commands",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("customer_id", Text, nullable=False),
    Column("environment_id", Text, nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("action", Text, nullable=False),
    Column("resource_kind", Text, nullable=False),
    Column("resource_name", Text, nullable=False),
    Column("version", Text),
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("result_message", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The partition of the customer, so a controller touches only its own commands.
    Column("partition", Integer, nullable=False),
    # Offered to the agent from not_before on; re-offered or timed out after deadline_at.
    Column("not_before", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("deadline_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("action IN ('create', 'update', 'delete')", name="commands_action"),
    CheckConstraint(
        "status IN ('pending', 'succeeded', 'failed', 'timed_out', 'superseded')",
        name="commands_status",
    ),
    Index("commands_environment_status", "customer_id", "environment_id", "status"),
    Index(
        "commands_one_pending_per_resource",
        "customer_id",
        "environment_id",
        "resource_kind",
        "resource_name",
        unique=True,
        postgresql_where=text("status = 'pending'"),
    ),
    Index(
        "commands_partition_pending",
        "partition",
        "deadline_at",
        postgresql_where=text("status = 'pending'"),
    ),
)

operator_audit: Final = Table(
    "operator_audit",
    metadata,
    Column("change_id", Text, primary_key=True),
    Column("customer_id", Text, nullable=False),
    Column("environment_id", Text, nullable=False),
    Column("operator", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("outcome", Text, nullable=False),
    Column("reason", Text),
    Column("request_id", Text),
    Column("accepted_at", DateTime(timezone=True), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("operator_audit_customer", "customer_id", "accepted_at"),
)

# Owned by gateway_auth; the API reads it to authenticate operators.
operator_keys: Final = Table(
    "operator_keys",
    metadata,
    Column("key_id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("secret_sha256", LargeBinary, nullable=False),
    # NULL: the key may act on every customer.
    Column("customer_id", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("revoked_at", DateTime(timezone=True)),
)

# --- Agent identity lifecycle: owned by gateway_auth (migration 0003) ---------------
# The API reads revocations, agent_certificates and issuing_cas to end revoked
# agents' long polls.

enrollment_tokens: Final = Table(
    "enrollment_tokens",
    metadata,
    # Only a hash of the token is stored; the token is shown once to the operator.
    Column("token_sha256", LargeBinary, primary_key=True),
    Column("token_id", Text, nullable=False, unique=True),
    Column("customer_id", Text, nullable=False),
    Column("environment_id", Text, nullable=False),
    # NULL: the enrolling agent names itself in its CSR.
    Column("agent_id", Text),
    Column("created_by", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True)),
    Column("used_by_serial", Text),
)

agent_certificates: Final = Table(
    "agent_certificates",
    metadata,
    # Lower-case hex without leading zeros (services.shared.revocations.normal_serial).
    Column("serial", Text, primary_key=True),
    Column("customer_id", Text, nullable=False),
    Column("environment_id", Text, nullable=False),
    Column("agent_id", Text, nullable=False),
    Column("issuer_dn", Text, nullable=False),
    Column("not_after", DateTime(timezone=True), nullable=False),
    Column("issued_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("via", Text, nullable=False),
    Column("previous_serial", Text),
    CheckConstraint("via IN ('enrollment', 'renewal')", name="agent_certificates_via"),
    Index("agent_certificates_identity", "customer_id", "environment_id", "agent_id"),
)

revocations: Final = Table(
    "revocations",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("customer_id", Text, nullable=False),
    Column("environment_id", Text, nullable=False),
    # NULL: the whole environment.
    Column("agent_id", Text),
    # Certificates of the scope issued up to this instant are revoked; later ones
    # (a new enrollment the operator allowed) are not.
    Column("revoked_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("revoked_by", Text, nullable=False),
    Column("reason", Text),
    Index("revocations_scope", "customer_id", "environment_id"),
)

issuing_cas: Final = Table(
    "issuing_cas",
    metadata,
    # RFC 4514 form, as nginx's $ssl_client_i_dn gives it.
    Column("subject_dn", Text, primary_key=True),
    Column("certificate_pem", Text, nullable=False),
    Column("added_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # NULL: trusted; else trusted until this instant (the rotation window).
    Column("retire_at", DateTime(timezone=True)),
)

identity_audit: Final = Table(
    "identity_audit",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("customer_id", Text, nullable=False),
    Column("environment_id", Text, nullable=False),
    Column("agent_id", Text),
    Column("action", Text, nullable=False),
    # "operator:<key id>" or "agent:<serial>".
    Column("actor", Text, nullable=False),
    Column("serial", Text),
    Column("detail", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("request_id", Text),
    CheckConstraint(
        "action IN ('token_created', 'token_used', 'certificate_issued', "
        "'certificate_renewed', 'revoked')",
        name="identity_audit_action",
    ),
    Index("identity_audit_customer", "customer_id", "at"),
)

FLEET_TABLES: Final = (
    partition_ownership,
    environments,
    agent_status,
    event_records,
    commands,
    operator_audit,
)

"""Migration 0004 moves existing rows to the agents' whole identity.

Rows are written as the (customer, agent)-keyed schema of revision 0003 held them,
including the damage that key did: one status row shared by ``agent-1`` of prod and
of staging, last written by staging, carrying prod's heartbeat time; and an agent
moved back to an older boot by a late event.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from alembic import command
from psycopg import sql
from sqlalchemy import create_engine, inspect

from services.controller.handlers import PREVIOUS_BOOTS_KEPT
from services.shared.migrate import MIGRATIONS, alembic_config
from tests.support.stack import Stack, drop_database

T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
def database(stack: Stack) -> Iterator[str]:
    name = f"fleetplane_m{uuid.uuid4().hex[:10]}"
    with psycopg.connect(stack.admin_dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield name
    drop_database(stack, name)


def _record(
    env: str, agent: str, event_id: str, boot: str, seq: int, minute: int, **extra: Any
) -> dict[str, Any]:
    at = T0 + timedelta(minutes=minute)
    return {
        "customer_id": "acme",
        "environment_id": env,
        "agent_id": agent,
        "event_id": event_id,
        "event_type": extra.get("event_type", "heartbeat"),
        "boot_id": boot,
        "seq": seq,
        "status": extra.get("status", "applied"),
        "partition": 0,
        "offset": minute,
        "epoch": 1,
        "accepted_at": at,
        "applied_at": at,
    }


ROWS_0003 = [
    # agent-1 of prod: boot p1, heartbeats at minutes 1 and 3.
    _record("prod", "agent-1", "ev-1", "p1", 1, 1),
    _record("prod", "agent-1", "ev-2", "p1", 2, 3),
    # agent-1 of staging: boot s1, then s2; its last event (minute 4) wrote the row.
    _record("staging", "agent-1", "ev-3", "s1", 1, 2),
    _record("staging", "agent-1", "ev-4", "s2", 1, 4, event_type="observed_state"),
    # agent-2 of prod alone: boot b1, then b2 (minute 6), then a late b1 event
    # (minute 7) moved it back to b1.
    _record("prod", "agent-2", "ev-1", "b1", 1, 5),
    _record("prod", "agent-2", "ev-2", "b2", 1, 6),
    _record("prod", "agent-2", "ev-3", "b1", 2, 7),
]
STATUS_0003 = [
    # The shared row: staging wrote it last, with prod's later heartbeat time carried over.
    ("acme", "agent-1", "staging", "s2", 1, T0 + timedelta(minutes=4), T0 + timedelta(minutes=3)),
    ("acme", "agent-2", "prod", "b1", 2, T0 + timedelta(minutes=7), T0 + timedelta(minutes=7)),
]


@pytest.mark.timeout(60)
def test_upgrade_from_0003_moves_rows_to_the_whole_identity(stack: Stack, database: str) -> None:
    settings = stack.database.model_copy(update={"database_name": database})
    config = alembic_config(settings.sync_url)
    command.upgrade(config, "0003")
    dsn = stack.admin_dsn(database)
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO event_records (customer_id, environment_id, agent_id, event_id,"
            ' event_type, boot_id, seq, status, partition, "offset", epoch, accepted_at,'
            " applied_at) VALUES (%(customer_id)s, %(environment_id)s, %(agent_id)s,"
            " %(event_id)s, %(event_type)s, %(boot_id)s, %(seq)s, %(status)s,"
            " %(partition)s, %(offset)s, %(epoch)s, %(accepted_at)s, %(applied_at)s)",
            ROWS_0003,
        )
        cur.executemany(
            "INSERT INTO agent_status (customer_id, agent_id, environment_id, boot_id,"
            " last_seq, last_event_at, last_heartbeat_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            STATUS_0003,
        )

    command.upgrade(config, "head")

    engine = create_engine(settings.sync_url)
    try:
        keys = inspect(engine)
        assert keys.get_pk_constraint("agent_status")["constrained_columns"] == [
            "customer_id",
            "environment_id",
            "agent_id",
        ]
        assert keys.get_pk_constraint("event_records")["constrained_columns"] == [
            "customer_id",
            "environment_id",
            "agent_id",
            "event_id",
        ]
    finally:
        engine.dispose()

    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM event_records").fetchone() == (len(ROWS_0003),)
        status = {
            (env, agent): rest
            for env, agent, *rest in conn.execute(
                "SELECT environment_id, agent_id, boot_id, last_seq, last_event_at,"
                " last_heartbeat_at, resync_reason, previous_boots FROM agent_status"
            )
        }
        # The same event id may now be recorded once per environment.
        conn.execute(
            "INSERT INTO event_records (customer_id, environment_id, agent_id, event_id,"
            ' event_type, boot_id, seq, status, partition, "offset", epoch, accepted_at)'
            " VALUES ('acme', 'staging', 'agent-1', 'ev-1', 'heartbeat', 's2', 2, 'applied',"
            " 0, 8, 1, now())"
        )
    assert status == {
        # Each agent-1 rebuilt from its own records, asked for a full-state report.
        ("prod", "agent-1"): [
            "p1",
            2,
            T0 + timedelta(minutes=3),
            T0 + timedelta(minutes=3),
            "identity_split",
            [],
        ],
        ("staging", "agent-1"): [
            "s2",
            1,
            T0 + timedelta(minutes=4),
            T0 + timedelta(minutes=2),
            "identity_split",
            ["s1"],
        ],
        # Left where it was (a single agent); its newer boot b2 is not counted as
        # left, so b2's next event moves it forward again.
        ("prod", "agent-2"): [
            "b1",
            2,
            T0 + timedelta(minutes=7),
            T0 + timedelta(minutes=7),
            None,
            [],
        ],
    }

    command.downgrade(config, "0003")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM agent_status").fetchone() == (2,)


def test_migration_remembers_as_many_boots_as_the_controller() -> None:
    source = (MIGRATIONS / "versions" / "0004_agent_full_identity.py").read_text()
    assert f"[1:{PREVIOUS_BOOTS_KEPT}]" in source

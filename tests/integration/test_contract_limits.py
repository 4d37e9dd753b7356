"""What PostgreSQL can store, and the contract that admits exactly that.

First the database itself: each class of value the contract refuses is shown to be
refused by the real PostgreSQL where the controller would write it, and each value
at the contract's limit is shown to be stored (and read back). Then the whole path:
for every field of every event type and of the desired-state body, values at and
just beyond what its column holds go through the real edge, API, Kafka and a
running controller; each is refused with 422 naming the field, or accepted and
applied, and afterwards nothing is dead-lettered and every partition's lag is 0.
"""

from __future__ import annotations

import itertools
import json
import random
import string
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
import pytest
import sqlalchemy
from sqlalchemy import Engine, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, StatementError

from services.shared.schema import commands, environments, event_records
from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.drain import assert_drained
from tests.support.invariants import Ledger, check
from tests.support.operators import OperatorClient
from tests.support.stack import Stack

CUSTOMER: Final = "limits-co"
ENVIRONMENT: Final = "prod"
ASTRAL: Final = "\U0001f600"
# The longest free text the contract takes, with every kind of character it takes:
# C0 controls and DEL, noncharacters, the last code point, and 4-byte UTF-8.
EDGE_TEXT: Final = "".join(chr(c) for c in range(1, 32)) + "\x7f\ufffe\uffff\U0010ffff"
LONGEST_TEXT: Final = EDGE_TEXT + ASTRAL * (2048 - len(EDGE_TEXT))
LONGEST_NAME: Final = "n" * 60 + "/" + "m" * 67  # 128 characters, two segments
LONGEST_KIND: Final = "k" + "8" * 31
LONGEST_VERSION: Final = "v" * 64
OBSERVED_VERSION: Final = "w" * 64
"""What the agent reports for the longest resource: the controller sends an update."""
LONGEST_ID: Final = "e" * 64
LONGEST_AGENT_VERSION: Final = "999999.999999.999999-" + "r" * 32


# --- PostgreSQL itself ---------------------------------------------------------------


@pytest.fixture
def engine(deployment: Deployment) -> Iterator[Engine]:
    """The deployment's database through SQLAlchemy and psycopg 3, as the controller writes."""
    made = sqlalchemy.create_engine(deployment.fleet.database.sync_url)
    yield made
    made.dispose()


def refusal(engine: Engine, statement: Any) -> str | None:
    """None if PostgreSQL stored it; else the SQLSTATE, or the client-side error's type."""
    try:
        with engine.begin() as conn:
            conn.execute(statement)
    except (DBAPIError, StatementError) as e:
        sqlstate = getattr(e.orig, "sqlstate", None)
        return sqlstate or type(e.orig).__name__
    except UnicodeEncodeError as e:  # raised by the driver, not wrapped by SQLAlchemy
        return type(e).__name__
    return None


def command(**values: Any) -> Any:
    row = {
        "customer_id": "c",
        "environment_id": "e",
        "epoch": 1,
        "revision": 1,
        "action": "create",
        "resource_kind": "k",
        "resource_name": f"r-{next(_names)}",
        "partition": 0,
        "deadline_at": datetime.now(UTC),
        **values,
    }
    return insert(commands).values(**row)


def environment(observed: Any) -> Any:
    return insert(environments).values(
        customer_id="c", environment_id=f"e-{next(_names)}", observed_state=observed
    )


def event_record(**values: Any) -> Any:
    row = {
        "customer_id": "c",
        "agent_id": "a",
        "event_id": f"ev-{next(_names)}",
        "environment_id": "e",
        "event_type": "heartbeat",
        "boot_id": "b",
        "seq": 1,
        "status": "applied",
        "partition": 0,
        "offset": 0,
        "epoch": 1,
        "accepted_at": datetime.now(UTC),
        **values,
    }
    return insert(event_records).values(**row)


_names = itertools.count()
# Incompressible ASCII: btree entries are compressed first, so a repetitive long
# value may still fit; this one cannot.
_RANDOM_ASCII: Final = "".join(random.Random(9).choices(string.ascii_letters, k=3000))


def test_postgresql_refuses_each_class_the_contract_refuses(engine: Engine) -> None:
    refused = {
        # text: no NUL (psycopg refuses before sending: DataError, no SQLSTATE)
        "text NUL": refusal(engine, command(result_message="a\x00b")),
        # no UTF-8 form for an unpaired surrogate: the driver cannot even encode it
        "text surrogate": refusal(engine, command(result_message="\ud800")),
        # jsonb: the \u0000 escape, in a string and in a key; NaN / Infinity are not JSON
        "jsonb NUL string": refusal(engine, environment([{"status": "a\x00"}])),
        "jsonb NUL key": refusal(engine, environment([{"st\x00": "a"}])),
        "jsonb surrogate": refusal(engine, environment([{"status": "\udc00"}])),
        "jsonb NaN": refusal(engine, environment([{"n": float("nan")}])),
        "jsonb Infinity": refusal(engine, environment([{"n": float("inf")}])),
        # numeric behind jsonb numbers: 131072 digits before the point, 16383 after
        "jsonb numeric too large": refusal(engine, text("SELECT '[1e131072]'::jsonb")),
        "jsonb numeric too small": refusal(engine, text("SELECT '[1e-16384]'::jsonb")),
        # integers
        "bigint 2**63": refusal(engine, command(revision=2**63)),
        "bigint -2**63-1": refusal(engine, command(revision=-(2**63) - 1)),
        "integer 2**31": refusal(engine, command(attempts=2**31)),
        "bigint in a lookup": refusal(engine, select(commands.c.id).where(commands.c.id == 2**63)),
        # btree entries: at most 2704 bytes (8191 before compression)
        "btree primary key": refusal(engine, event_record(event_id=_RANDOM_ASCII)),
        "btree unique index": refusal(engine, command(resource_name=_RANDOM_ASCII)),
        # timestamptz: 4713 BC to 294276 AD
        "timestamptz after 294276": refusal(
            engine, text("SELECT '294277-01-01 00:00:00+00'::timestamptz")
        ),
    }
    assert refused == {
        "text NUL": "DataError",
        "text surrogate": "UnicodeEncodeError",
        "jsonb NUL string": "22P05",
        "jsonb NUL key": "22P05",
        "jsonb surrogate": "22P02",
        "jsonb NaN": "22P02",
        "jsonb Infinity": "22P02",
        "jsonb numeric too large": "22003",
        "jsonb numeric too small": "22003",
        "bigint 2**63": "22003",
        "bigint -2**63-1": "22003",
        "integer 2**31": "22003",
        "bigint in a lookup": "22003",
        "btree primary key": "54000",
        "btree unique index": "54000",
        "timestamptz after 294276": "22008",
    }


def test_postgresql_stores_every_value_at_the_contracts_limits(engine: Engine) -> None:
    resources = [
        {"name": LONGEST_NAME, "kind": LONGEST_KIND, "version": LONGEST_VERSION, "status": ""}
    ] + [
        {"name": f"r{i}", "kind": "k", "version": "1", "status": LONGEST_TEXT}
        for i in range(1, 1000)
    ]
    stored = {
        "longest text": refusal(engine, command(result_message=LONGEST_TEXT)),
        "longest indexed name": refusal(
            engine, command(resource_name=LONGEST_NAME, resource_kind=LONGEST_KIND)
        ),
        "longest event id": refusal(engine, event_record(event_id=LONGEST_ID, boot_id=LONGEST_ID)),
        "largest integers": refusal(engine, command(revision=2**53, epoch=2**62)),
        "1000 resources": refusal(engine, environment(resources)),
        "earliest instant": refusal(
            engine, event_record(accepted_at=datetime(2, 1, 1, tzinfo=UTC))
        ),
        "latest instant": refusal(
            engine, event_record(accepted_at=datetime(9998, 12, 31, 23, 59, 59, tzinfo=UTC))
        ),
    }
    assert all(outcome is None for outcome in stored.values()), stored
    with engine.connect() as conn:
        message = conn.execute(
            select(commands.c.result_message).where(commands.c.result_message.is_not(None))
        ).scalar_one()
        assert message == LONGEST_TEXT
        # Instants at the contract's ends read back as Python datetimes in any zone.
        for zone in ("Pacific/Kiritimati", "Etc/GMT+12"):
            conn.execute(text(f"SET TIME ZONE '{zone}'"))
            moments = conn.execute(select(event_records.c.accepted_at)).scalars().all()
            assert len(moments) == 3


def test_an_instant_outside_the_contract_is_stored_but_cannot_be_read(engine: Engine) -> None:
    # Why the records' accepted_at is held to years 2..9998: PostgreSQL keeps year 1,
    # but a session west of UTC reads it as 1 BC, which psycopg cannot load.
    assert refusal(engine, event_record(accepted_at=datetime(1, 1, 1, tzinfo=UTC))) is None
    with engine.connect() as conn:
        conn.execute(text("SET TIME ZONE 'Etc/GMT+12'"))
        with pytest.raises(StatementError):
            conn.execute(select(event_records.c.accepted_at)).scalars().all()


# --- through the edge, API, Kafka and a controller -------------------------------------


def with_payload(event: dict[str, Any], **payload: Any) -> dict[str, Any]:
    return {**event, "payload": {**event["payload"], **payload}}


def resource(**values: str) -> dict[str, str]:
    return {"name": "web", "kind": "deployment", "version": "1.0.0", **values}


Case = tuple[str, Callable[[AgentClient], dict[str, Any]], str | None]
"""(label, event built by the agent, field named in the 422 or None for accepted)."""
EVENT_CASES: Final[list[Case]] = [
    # event envelope: event_records.event_id (primary key), boot_id, seq (bigint)
    ("id at limit", lambda a: {**a.heartbeat(), "id": LONGEST_ID}, None),
    ("id beyond", lambda a: {**a.heartbeat(), "id": LONGEST_ID + "e"}, "events[0].id"),
    ("id NUL", lambda a: {**a.heartbeat(), "id": "ev\x00"}, "events[0].id"),
    ("id non-ASCII", lambda a: {**a.heartbeat(), "id": "\u00e9v"}, "events[0].id"),
    ("boot id beyond", lambda a: {**a.heartbeat(), "boot_id": "b" * 65}, "events[0].boot_id"),
    ("boot id NUL", lambda a: {**a.heartbeat(), "boot_id": "b\x00"}, "events[0].boot_id"),
    ("seq beyond", lambda a: {**a.heartbeat(), "seq": 2**53 + 1}, "events[0].seq"),
    ("seq beyond bigint", lambda a: {**a.heartbeat(), "seq": 2**63}, "events[0].seq"),
    ("seq negative", lambda a: {**a.heartbeat(), "seq": -1}, "events[0].seq"),
    ("seq NaN", lambda a: {**a.heartbeat(), "seq": float("nan")}, "events[0].seq"),
    ("seq Infinity", lambda a: {**a.heartbeat(), "seq": float("inf")}, "events[0].seq"),
    # heartbeat payload: environments.agent_version, health; message is not stored
    (
        "agent version at limit",
        lambda a: with_payload(a.heartbeat(), agent_version=LONGEST_AGENT_VERSION),
        None,
    ),
    (
        "agent version beyond",
        lambda a: with_payload(a.heartbeat(), agent_version=LONGEST_AGENT_VERSION + "r"),
        "events[0].payload.agent_version",
    ),
    (
        "agent version NUL",
        lambda a: with_payload(a.heartbeat(), agent_version="1.0.0-\x00"),
        "events[0].payload.agent_version",
    ),
    (
        "agent version non-ASCII digits",
        lambda a: with_payload(a.heartbeat(), agent_version="\u0661.0.0"),
        "events[0].payload.agent_version",
    ),
    ("heartbeat message at limit", lambda a: a.heartbeat(message=LONGEST_TEXT), None),
    (
        "heartbeat message beyond",
        lambda a: a.heartbeat(message=LONGEST_TEXT + "x"),
        "events[0].payload.message",
    ),
    ("heartbeat message NUL", lambda a: a.heartbeat(message="\x00"), "events[0].payload.message"),
    (
        "heartbeat message surrogate",
        lambda a: a.heartbeat(message="ok \ud800"),
        "events[0].payload.message",
    ),
    # observed state: environments.observed_state (jsonb)
    (
        "1000 resources",
        lambda a: a.observed([resource(name=f"r{i}", status="ok") for i in range(1000)]),
        None,
    ),
    (
        "1001 resources",
        lambda a: a.observed([resource(name=f"r{i}") for i in range(1001)]),
        "events[0].payload.resources",
    ),
    (
        "resource fields at limit",
        lambda a: a.observed(
            [
                resource(
                    name=LONGEST_NAME,
                    kind=LONGEST_KIND,
                    version=OBSERVED_VERSION,
                    status=LONGEST_TEXT,
                )
            ]
        ),
        None,
    ),
    (
        "resource name beyond",
        lambda a: a.observed([resource(name=LONGEST_NAME + "m")]),
        "events[0].payload.resources[0].name",
    ),
    (
        "resource name NUL",
        lambda a: a.observed([resource(name="web\x00")]),
        "events[0].payload.resources[0].name",
    ),
    (
        "resource kind beyond",
        lambda a: a.observed([resource(kind=LONGEST_KIND + "8")]),
        "events[0].payload.resources[0].kind",
    ),
    (
        "resource version beyond",
        lambda a: a.observed([resource(version=LONGEST_VERSION + "v")]),
        "events[0].payload.resources[0].version",
    ),
    (
        "resource status beyond",
        lambda a: a.observed([resource(status=LONGEST_TEXT + "x")]),
        "events[0].payload.resources[0].status",
    ),
    (
        "resource status NUL",
        lambda a: a.observed([resource(status="a\x00b")]),
        "events[0].payload.resources[0].status",
    ),
    (
        "resource status surrogate",
        lambda a: a.observed([resource(status="\udfff")]),
        "events[0].payload.resources[0].status",
    ),
    # command result: commands.id (bigint lookup), commands.result_message (text)
    ("command id at limit", lambda a: a.command_result(2**62, 1), None),
    (
        "command id beyond",
        lambda a: a.command_result(2**62 + 1, 1),
        "events[0].payload.command_id",
    ),
    (
        "command id beyond bigint",
        lambda a: a.command_result(2**63, 1),
        "events[0].payload.command_id",
    ),
    # (an unknown command: ids from 1 up are the deployment's own commands)
    ("epoch at limit", lambda a: a.command_result(2**62 - 1, 2**62), None),
    ("epoch beyond", lambda a: a.command_result(1, 2**62 + 1), "events[0].payload.epoch"),
    (
        "result message NUL",
        lambda a: with_payload(a.command_result(1, 1), message="failed\x00"),
        "events[0].payload.message",
    ),
    (
        "result message surrogate",
        lambda a: with_payload(a.command_result(1, 1), message="\ud83d"),
        "events[0].payload.message",
    ),
    (
        "result message beyond",
        lambda a: with_payload(a.command_result(1, 1), message=LONGEST_TEXT + "x"),
        "events[0].payload.message",
    ),
]
# The operator listener runs the OWASP CRS over bodies, which refuses a NUL byte
# (\u0000 decoded) before the API sees it; the API's 422 for it is a unit test.
EDGE_REFUSED: Final = frozenset({"name NUL"})
DESIRED_CASES: Final[list[tuple[str, dict[str, Any], str]]] = [
    ("revision beyond", {"revision": 2**53 + 1, "resources": []}, "revision"),
    ("revision beyond bigint", {"revision": 2**63, "resources": []}, "revision"),
    (
        "name beyond",
        {"revision": 2, "resources": [{"kind": "job", "name": "a" * 129, "version": "1"}]},
        "resources[0].name",
    ),
    (
        "name NUL",
        {"revision": 2, "resources": [{"kind": "job", "name": "a\x00", "version": "1"}]},
        "resources[0].name",
    ),
    (
        "version surrogate",
        {"revision": 2, "resources": [{"kind": "job", "name": "a", "version": "\ud800"}]},
        "resources[0].version",
    ),
    (
        "kind beyond",
        {"revision": 2, "resources": [{"kind": LONGEST_KIND + "8", "name": "a", "version": "1"}]},
        "resources[0].kind",
    ),
]


async def post_one(agent: AgentClient, event: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    # json.dumps writes NUL, controls and lone surrogates as \u escapes, as a client
    # would; NaN and Infinity as the bare words Python's and pydantic's parsers read.
    body = json.dumps({"events": [event]}).encode()
    status, reply, _ = await agent.post_raw(body)
    return status, reply


def refused_field(status: int, reply: dict[str, Any]) -> list[str]:
    assert status == 422, reply
    assert reply["type"] == "urn:fleetplane:problem:validation-failed", reply
    return [error["field"] for error in reply["errors"]]


@pytest.mark.timeout(120)
async def test_values_at_and_beyond_each_column_are_applied_or_refused_with_422(
    deployment: Deployment, stack: Stack, agents: Callable[[str, str, str], AgentClient]
) -> None:
    deployment.start_apis()
    deployment.start_controller()
    operator = OperatorClient(stack.pki_dir, deployment.operator_key(CUSTOMER), stack.operator_url)
    dsn = deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)
    ledger = Ledger()
    # Spread over agents so no identity nears the edge's rate limit (10 r/s, burst 40).
    pool = [agents(CUSTOMER, ENVIRONMENT, f"limits-{n}") for n in range(4)]
    turn = itertools.cycle(pool)

    # The desired state names the longest resource, so the controller writes it to
    # commands.resource_name (in a unique btree index).
    longest = {"kind": LONGEST_KIND, "name": LONGEST_NAME, "version": LONGEST_VERSION}
    status, reply = await operator.set_desired(CUSTOMER, ENVIRONMENT, 1, [longest])
    assert status == 202, reply
    for label, body, desired_field in DESIRED_CASES:
        status, reply = await operator.request(
            "PUT",
            f"/v1/operator/customers/{CUSTOMER}/environments/{ENVIRONMENT}/desired-state",
            body,
        )
        if label in EDGE_REFUSED and status == 403:
            assert reply["detail"] == "the request was refused by the edge firewall", reply
            continue
        assert refused_field(status, reply) == [desired_field], label

    wrong: list[str] = []
    for label, build, field in EVENT_CASES:
        agent = next(turn)
        event = build(agent)
        status, reply = await post_one(agent, event)
        if field is None:
            if status != 202:
                wrong.append(f"{label}: {status} {reply}")
            else:
                ledger.record(agent.customer_id, agent.environment_id, agent.agent_id, [event])
        elif status != 422 or [e["field"] for e in reply.get("errors", [])] != [field]:
            wrong.append(f"{label}: {status} {reply}")
    # The largest sequence number, from an agent of its own (its later events would
    # be stale otherwise).
    big = agents(CUSTOMER, ENVIRONMENT, "limits-seq")
    # Also the last heartbeat: environments.agent_version keeps its longest value.
    event = {**with_payload(big.heartbeat(), agent_version=LONGEST_AGENT_VERSION), "seq": 2**53}
    status, reply = await post_one(big, event)
    if status == 202:
        ledger.record(CUSTOMER, ENVIRONMENT, big.agent_id, [event])
    else:
        wrong.append(f"seq at limit: {status} {reply}")
    assert not wrong, "\n".join(wrong)

    # Every report applied, the update for the longest resource is pending; it is
    # settled with the longest message.
    await assert_drained(deployment)
    poller = pool[0]
    status, offered = await poller.poll_commands(0)
    assert status == 200, offered
    [offer] = [c for c in offered["commands"] if c["resource"]["name"] == LONGEST_NAME]
    assert (offer["action"], offer["resource"]["version"]) == ("update", LONGEST_VERSION), offer
    settle = with_payload(poller.command_result(offer["id"], offer["epoch"]), message=LONGEST_TEXT)
    status, reply = await post_one(poller, settle)
    assert status == 202, reply
    ledger.record(CUSTOMER, ENVIRONMENT, poller.agent_id, [settle])
    # The largest revision, last (no later one could be above it).
    status, reply = await operator.set_desired(CUSTOMER, ENVIRONMENT, 2**53, [longest])
    assert status == 202, reply

    await assert_drained(deployment)
    report = check(ledger, dsn)
    assert report.ok, report
    assert report.recorded == report.accepted == len(ledger), report
    with psycopg.connect(dsn) as conn:
        env = conn.execute(
            "SELECT agent_version, observed_state, desired_revision FROM environments "
            "WHERE customer_id = %s AND environment_id = %s",
            (CUSTOMER, ENVIRONMENT),
        ).fetchone()
        settled = conn.execute(
            "SELECT status, result_message FROM commands WHERE id = %s", (offer["id"],)
        ).fetchone()
        audits = conn.execute(
            "SELECT revision, outcome FROM operator_audit WHERE customer_id = %s ORDER BY revision",
            (CUSTOMER,),
        ).fetchall()
    assert env is not None
    assert env[0] == LONGEST_AGENT_VERSION
    assert env[1] == [
        {
            "name": LONGEST_NAME,
            "kind": LONGEST_KIND,
            "version": OBSERVED_VERSION,
            "status": LONGEST_TEXT,
        }
    ]
    assert env[2] == 2**53
    assert settled == ("succeeded", LONGEST_TEXT)
    assert [revision for revision, _ in audits] == [1, 2**53]
    assert all(controller.alive() for controller in deployment.controllers.values())

"""The contract refuses every value PostgreSQL would refuse where the controller stores it.

Each class of unstorable value (docs/architecture.md, "What PostgreSQL can store") is
tried on every field it applies to; ``tests/integration/test_contract_limits.py``
shows the same values against the real database and through the real path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

import pytest
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import BigInteger, Integer, Text

from services.api.openapi import build_openapi
from services.api.service import parse_batch, parse_desired_state
from services.api.settings import ApiSettings
from services.controller.handlers import Delivered, Poison, decode
from services.shared import schema
from services.shared.events import (
    NUL_FREE_PATTERN,
    REQUEST_ID_PATTERN,
    UNSTORABLE_NUL,
    UNSTORABLE_SURROGATE,
    DesiredResource,
    ObservedResource,
    TopicRecord,
)
from services.shared.problems import MalformedRequest, ValidationFailed

BTREE_MAX_ROW_BYTES: Final = 2704
"""PostgreSQL 15's btree limit for one index entry with 8 kB pages (54000 beyond it)."""

# Every field of every contract, as its JSON-schema definition and property, and the
# column the controller writes it to ("-" : carried, never stored). A field added to
# a contract fails test_every_field_has_a_storage_decision until it is placed here.
STORAGE: Final[dict[str, str]] = {
    "EventBatch.events": "-",
    "HeartbeatEvent.id": "event_records.event_id",
    "HeartbeatEvent.boot_id": "event_records.boot_id",
    "HeartbeatEvent.seq": "event_records.seq",
    "HeartbeatEvent.type": "event_records.event_type",
    "HeartbeatEvent.payload": "-",
    "HeartbeatPayload.agent_version": "environments.agent_version",
    "HeartbeatPayload.health": "environments.health",
    "HeartbeatPayload.message": "-",
    "ObservedStateEvent.id": "event_records.event_id",
    "ObservedStateEvent.boot_id": "event_records.boot_id",
    "ObservedStateEvent.seq": "event_records.seq",
    "ObservedStateEvent.type": "event_records.event_type",
    "ObservedStateEvent.payload": "-",
    "ObservedStatePayload.resources": "environments.observed_state",
    "ObservedResource.name": "environments.observed_state",
    "ObservedResource.kind": "environments.observed_state",
    "ObservedResource.version": "environments.observed_state",
    "ObservedResource.status": "environments.observed_state",
    "CommandResultEvent.id": "event_records.event_id",
    "CommandResultEvent.boot_id": "event_records.boot_id",
    "CommandResultEvent.seq": "event_records.seq",
    "CommandResultEvent.type": "event_records.event_type",
    "CommandResultEvent.payload": "-",
    "CommandResultPayload.command_id": "commands.id",
    "CommandResultPayload.epoch": "-",
    "CommandResultPayload.outcome": "commands.status",
    "CommandResultPayload.message": "commands.result_message",
    "DesiredState.revision": "environments.desired_revision",
    "DesiredState.resources": "environments.desired_state",
    "DesiredResource.kind": "commands.resource_kind",
    "DesiredResource.name": "commands.resource_name",
    "DesiredResource.version": "commands.version",
    "AgentEventRecord.schema_version": "-",
    "AgentEventRecord.kind": "-",
    "AgentEventRecord.customer_id": "event_records.customer_id",
    "AgentEventRecord.environment_id": "event_records.environment_id",
    "AgentEventRecord.agent_id": "event_records.agent_id",
    "AgentEventRecord.accepted_at": "event_records.accepted_at",
    "AgentEventRecord.request_id": "-",
    "AgentEventRecord.event": "-",
    "DesiredStateRecord.schema_version": "-",
    "DesiredStateRecord.kind": "-",
    "DesiredStateRecord.change_id": "operator_audit.change_id",
    "DesiredStateRecord.customer_id": "operator_audit.customer_id",
    "DesiredStateRecord.environment_id": "operator_audit.environment_id",
    "DesiredStateRecord.operator": "operator_audit.operator",
    "DesiredStateRecord.accepted_at": "operator_audit.accepted_at",
    "DesiredStateRecord.request_id": "operator_audit.request_id",
    "DesiredStateRecord.desired": "-",
}
INTEGER_RANGE: Final = {BigInteger: 2**63 - 1, Integer: 2**31 - 1}


def contract_schemas() -> dict[str, Any]:
    """JSON-schema definitions of both request bodies and both topic records."""
    document = build_openapi()["components"]["schemas"]
    records = TypeAdapter(TopicRecord).json_schema()["$defs"]
    return {**records, **{k: v for k, v in document.items() if k in ("EventBatch", "DesiredState")}}


def column(name: str) -> Any:
    table, col = name.split(".")
    return getattr(schema, table).c[col]


def indexed_columns() -> set[str]:
    found = set()
    for table in schema.FLEET_TABLES:
        for col in table.primary_key.columns:
            found.add(f"{table.name}.{col.name}")
        for index in table.indexes:
            for col in index.columns:
                found.add(f"{table.name}.{col.name}")
    return found


def test_every_field_has_a_storage_decision() -> None:
    fields = {
        f"{name}.{prop}"
        for name, definition in contract_schemas().items()
        for prop in definition.get("properties", {})
    }
    assert fields == set(STORAGE)
    for target in set(STORAGE.values()) - {"-"}:
        column(target)  # names a real column


def test_integer_bounds_fit_their_columns() -> None:
    schemas = contract_schemas()
    checked = 0
    for key, target in STORAGE.items():
        name, prop = key.split(".")
        definition = schemas[name]["properties"][prop]
        if definition.get("type") != "integer" or target == "-":
            continue
        limit = INTEGER_RANGE[type(column(target).type)]
        assert definition["minimum"] >= 0, key
        assert definition["maximum"] <= limit, key
        checked += 1
    assert checked == 5  # seq (x3), command_id, revision


def test_indexed_text_fields_are_ascii_and_fit_a_btree_entry() -> None:
    schemas = contract_schemas()
    indexed = indexed_columns()
    checked = []
    for key, target in STORAGE.items():
        if target not in indexed or not isinstance(column(target).type, Text):
            continue
        name, prop = key.split(".")
        definition = schemas[name]["properties"][prop]
        pattern = definition.get("pattern", "")
        # Every such pattern is a bounded run of an ASCII class: bytes = characters.
        assert pattern.isascii(), key
        assert "\\d" not in pattern, key
        assert "\\w" not in pattern, key
        longest = _longest(definition)
        assert longest * len("\uffff".encode()) <= BTREE_MAX_ROW_BYTES, key
        checked.append(key)
    assert "DesiredResource.name" in checked
    assert "HeartbeatEvent.id" in checked


def _longest(definition: dict[str, Any]) -> int:
    choices = definition.get("enum", [definition["const"]] if "const" in definition else [])
    if choices:
        assert all(choice.isascii() for choice in choices)
        return max(len(choice) for choice in choices)
    if "maxLength" in definition:
        return int(definition["maxLength"])
    # ^X{0,63}$ style patterns: first char plus the counted run.
    pattern = definition["pattern"]
    upper = int(pattern.rsplit(",", 1)[1].split("}", 1)[0])
    return upper + 1


def test_every_request_string_is_bounded_and_nul_free_in_the_document() -> None:
    document = build_openapi()["components"]["schemas"]
    for name in ("HeartbeatPayload", "ObservedResource", "CommandResultPayload", "DesiredResource"):
        for prop, definition in document[name]["properties"].items():
            if definition.get("type") != "string" or "enum" in definition:
                continue
            assert "pattern" in definition, (name, prop)
            assert "maxLength" in definition or "}" in definition["pattern"], (name, prop)
            if "[^" in definition["pattern"]:
                assert definition["pattern"] == NUL_FREE_PATTERN


def event(kind: str, payload: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return {
        "id": "ev-1",
        "boot_id": "boot-1",
        "seq": 1,
        "type": kind,
        "payload": payload,
        **overrides,
    }


def heartbeat_body(**payload: Any) -> bytes:
    body = {"agent_version": "1.0.0", "health": "ok", **payload}
    return json.dumps({"events": [event("heartbeat", body)]}).encode()


def observed_body(status: str) -> bytes:
    resource = {"name": "web", "kind": "deployment", "version": "1.0.0", "status": status}
    return json.dumps({"events": [event("observed_state", {"resources": [resource]})]}).encode()


def result_body(**payload: Any) -> bytes:
    body = {"command_id": 1, "epoch": 1, "outcome": "succeeded", **payload}
    return json.dumps({"events": [event("command_result", body)]}).encode()


# label -> (field named in the 422, body holding the text there)
FREE_TEXT_BODIES: Final[dict[str, tuple[str, Callable[[str], bytes]]]] = {
    "heartbeat message": ("events[0].payload.message", lambda t: heartbeat_body(message=t)),
    "observed status": ("events[0].payload.resources[0].status", observed_body),
    "command result message": ("events[0].payload.message", lambda t: result_body(message=t)),
}
UNSTORABLE_TEXT: Final = {
    "nul": ("a\x00b", UNSTORABLE_NUL),
    "nul only": ("\x00", UNSTORABLE_NUL),
    "lone high surrogate": ("\ud800", UNSTORABLE_SURROGATE),
    "lone low surrogate": ("x\udfff", UNSTORABLE_SURROGATE),
    "reversed pair": ("\udc00\ud800", UNSTORABLE_SURROGATE),
}
STORABLE_TEXT: Final = {
    "astral at the limit": "\U0001f600" * 2048,
    "controls but NUL": "".join(chr(c) for c in range(1, 32)) + "\x7f",
    "noncharacters": "\ufffe\uffff\U0010ffff",
    "paired surrogates": "\ud83d\ude00",
    "empty": "",
}


@pytest.mark.parametrize("case", UNSTORABLE_TEXT, ids=str)
@pytest.mark.parametrize("field", FREE_TEXT_BODIES, ids=str)
def test_unstorable_text_is_refused_naming_the_field(field: str, case: str) -> None:
    text, message = UNSTORABLE_TEXT[case]
    name, build = FREE_TEXT_BODIES[field]
    body = build(text)
    assert b"\\u" in body  # as JSON escapes, the way a client sends them
    with pytest.raises(ValidationFailed) as caught:
        parse_batch(body)
    assert [(e.field, message in e.message) for e in caught.value.errors] == [(name, True)]


@pytest.mark.parametrize("case", STORABLE_TEXT, ids=str)
@pytest.mark.parametrize("field", FREE_TEXT_BODIES, ids=str)
def test_storable_text_is_accepted(field: str, case: str) -> None:
    batch = parse_batch(FREE_TEXT_BODIES[field][1](STORABLE_TEXT[case]))
    assert len(batch.events) == 1


def test_free_text_beyond_its_length_is_refused() -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_batch(heartbeat_body(message="x" * 2049))
    assert caught.value.errors[0].field == "events[0].payload.message"


@pytest.mark.parametrize(
    "text",
    ["web\x00", "\ud800", "w\u00e9b", "x" * 129],
    ids=["nul", "surrogate", "non-ascii", "long"],
)
def test_desired_resource_names_are_refused_with_422(text: str) -> None:
    body = {"revision": 1, "resources": [{"kind": "job", "name": text, "version": "1"}]}
    with pytest.raises(ValidationFailed) as caught:
        parse_desired_state(json.dumps(body).encode())
    assert [e.field for e in caught.value.errors] == ["resources[0].name"]


def test_an_unpaired_surrogate_in_an_unknown_key_is_a_422_not_a_crash() -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_desired_state(b'{"revision": 1, "resources": [], "x\\ud800": 1}')
    assert caught.value.errors


def test_a_body_that_is_not_json_for_anyone_stays_400() -> None:
    with pytest.raises(MalformedRequest):
        parse_batch(b'{"events": [')
    with pytest.raises(MalformedRequest):
        parse_batch(b'{"events": ["\\uzzzz"]}')


# Python's and pydantic's JSON parsers read NaN and Infinity; jsonb and bigint do not.
NUMBERS: Final = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9223372036854775808",
                  "1e19", "-1", "0.5"]  # fmt: skip
JUST_BEYOND: Final = {"seq": 2**53 + 1, "command_id": 2**62 + 1, "epoch": 2**62 + 1}


@pytest.mark.parametrize("number", [*NUMBERS, "just beyond"])
@pytest.mark.parametrize("field", ["seq", "command_id", "epoch"])
def test_numbers_beyond_the_columns_are_refused(field: str, number: str) -> None:
    if number == "just beyond":
        number = str(JUST_BEYOND[field])
    body = result_body().decode().replace(f'"{field}": 1', f'"{field}": {number}')
    with pytest.raises(ValidationFailed) as caught:
        parse_batch(body.encode())
    assert caught.value.errors[0].field.endswith(field)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "1e400", "9007199254740993", "0"])
def test_revision_beyond_its_column_is_refused(number: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_desired_state(f'{{"revision": {number}, "resources": []}}'.encode())
    assert [e.field for e in caught.value.errors] == ["revision"]


def test_the_largest_body_is_far_below_what_jsonb_and_text_hold() -> None:
    # A jsonb string holds at most 0x0FFFFFFF bytes (54000 beyond: "string too long
    # to represent as jsonb string"), any field 1 GB. A value's UTF-8 form is never
    # longer than its JSON text in the body (an escape takes 6 or 12 bytes for at
    # most 4), and a body is at most the API's largest max_body_bytes.
    largest_body = ApiSettings.model_fields["max_body_bytes"].metadata
    bound = next(m.le for m in largest_body if getattr(m, "le", None) is not None)
    assert bound < 0x0FFFFFFF


def test_jsonb_documents_hold_only_flat_strings() -> None:
    # No number, nesting or agent-chosen key ever reaches jsonb: numeric's limits,
    # NaN and key escapes cannot arise there.
    for model in (ObservedResource, DesiredResource):
        dumped = model.model_validate({"name": "a", "kind": "b", "version": "1"}).model_dump()
        assert all(isinstance(v, str) for v in dumped.values())
        assert set(dumped) == set(model.model_fields)


# --- topic records: the controller's decode refuses them as poison --------------------


def record(**overrides: Any) -> dict[str, Any]:
    value = {
        "kind": "agent_event",
        "customer_id": "acme",
        "environment_id": "prod",
        "agent_id": "agent-1",
        "accepted_at": datetime.now(UTC).isoformat(),
        "request_id": "req-1",
        "event": event("heartbeat", {"agent_version": "1.0.0", "health": "ok"}),
    }
    value.update(overrides)
    return value


def change(**overrides: Any) -> dict[str, Any]:
    value = {
        "kind": "desired_state",
        "change_id": "c1",
        "customer_id": "acme",
        "environment_id": "prod",
        "operator": "0123456789ab",
        "accepted_at": datetime.now(UTC).isoformat(),
        "request_id": "req-1",
        "desired": {"revision": 1, "resources": []},
    }
    value.update(overrides)
    return value


def decoded(value: dict[str, Any]) -> object:
    return decode(Delivered(0, 0, b"acme", json.dumps(value).encode()))


@pytest.mark.parametrize(
    "value",
    [
        record(accepted_at="2026-01-02T03:04:05"),
        record(accepted_at="0001-01-01T00:00:00+00:00"),
        record(accepted_at="9999-12-31T23:59:59+00:00"),
        record(request_id="req\x00"),
        record(request_id="r" * 129),
        change(operator="key\x00"),
        change(request_id="with space"),
        change(accepted_at="2026-01-02T03:04:05"),
    ],
    ids=["naive", "year 1", "year 9999", "request id nul", "request id long", "operator nul",
         "request id space", "change naive"],
)  # fmt: skip
def test_records_the_database_could_not_store_or_read_are_poison(value: dict[str, Any]) -> None:
    outcome = decoded(value)
    assert isinstance(outcome, Poison), outcome
    assert outcome.reason == "invalid", outcome


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2, 1, 1, tzinfo=UTC),
        datetime(9998, 12, 31, 12, tzinfo=UTC),
        datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=-9))),
    ],
    ids=str,
)
def test_instants_within_the_readable_range_decode(moment: datetime) -> None:
    assert not isinstance(decoded(record(accepted_at=moment.isoformat())), Poison)
    assert not isinstance(decoded(change(accepted_at=moment.isoformat())), Poison)


def test_request_ids_the_api_keeps_are_the_ones_records_accept() -> None:
    kept = re.compile(REQUEST_ID_PATTERN)  # what the API's request-id middleware keeps
    for request_id in ["a" * 128, "edge:1.2-3_4", "0"]:
        assert kept.fullmatch(request_id)
        assert not isinstance(decoded(record(request_id=request_id)), Poison)
    for request_id in ["a" * 129, "", "a b", "a\nb", "a\x00"]:
        assert not kept.fullmatch(request_id)
        with pytest.raises(ValidationError):
            TypeAdapter(TopicRecord).validate_python(record(request_id=request_id))

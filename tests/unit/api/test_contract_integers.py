"""Integer fields: what the OpenAPI document promises is what the contracts accept."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from services.api.openapi import build_openapi
from services.shared.events import DesiredState, EventBatch

# pydantic's names for bounds; in a JSON schema they are unknown keywords that
# validators and generators ignore, so a bound written that way is no bound.
PYDANTIC_ONLY = frozenset({"ge", "gt", "le", "lt"})


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_the_document_states_bounds_in_json_schema_keywords() -> None:
    schemas = build_openapi()["components"]["schemas"]
    for schema in walk(schemas):
        if schema.get("type") == "integer":
            assert not PYDANTIC_ONLY & schema.keys(), schema
    seq = schemas["HeartbeatEvent"]["properties"]["seq"]
    assert (seq["minimum"], seq["maximum"]) == (0, 2**53)


def batch(seq: Any) -> str:
    event = {
        "id": "ev-1",
        "boot_id": "boot-1",
        "seq": seq,
        "type": "heartbeat",
        "payload": {"agent_version": "1.0.0", "health": "ok"},
    }
    return json.dumps({"events": [event]})


def test_a_whole_number_written_as_a_float_is_an_integer() -> None:
    # JSON Schema's "integer" accepts 7.0, so a client validating against the
    # document may send it; strict int fields refused it with 422.
    parsed = EventBatch.model_validate_json(batch(7.0))
    assert parsed.events[0].seq == 7
    assert isinstance(parsed.events[0].seq, int)
    desired = DesiredState.model_validate_json('{"revision": 3.0, "resources": []}')
    assert desired.revision == 3


@pytest.mark.parametrize("seq", [7.5, "7", True, -1.0, float(2**60)], ids=repr)
def test_other_numbers_and_types_are_still_refused(seq: Any) -> None:
    with pytest.raises(ValidationError):
        EventBatch.model_validate_json(batch(seq))

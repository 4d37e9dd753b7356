"""Agent input to problems: which field, which status, nothing accepted."""

from __future__ import annotations

import json

import pytest

from services.api.service import field_path, parse_batch
from services.shared.events import MAX_EVENTS_PER_BATCH
from services.shared.problems import (
    MAX_LISTED_ERRORS,
    FieldError,
    MalformedRequest,
    ServiceUnavailable,
    ValidationFailed,
    http_problem_body,
    problem_body,
)

from .events_data import batch_body, heartbeat, observed


@pytest.mark.parametrize(
    ("loc", "error_type", "expected"),
    [
        (("events", 3, "heartbeat", "payload", "agent_version"), "",
         "events[3].payload.agent_version"),
        (("events", 0, "observed_state", "payload", "resources", 7, "name"), "",
         "events[0].payload.resources[7].name"),
        (("events", 2), "union_tag_invalid", "events[2].type"),
        (("events", 2), "union_tag_not_found", "events[2].type"),
        (("events",), "too_short", "events"),
        ((), "model_type", "$"),
    ],
)  # fmt: skip
def test_field_path(loc: tuple[int | str, ...], error_type: str, expected: str) -> None:
    assert field_path(loc, error_type) == expected


def test_field_path_is_bounded() -> None:
    assert len(field_path(("events", 0, "x" * 10_000))) < 300


def test_a_valid_batch_parses() -> None:
    batch = parse_batch(batch_body(heartbeat("e1"), observed("e2", [])))
    assert [event.id for event in batch.events] == ["e1", "e2"]


def test_invalid_field_is_named_by_its_json_location() -> None:
    events = [heartbeat(f"e{i}", seq=i) for i in range(5)]
    events[3]["payload"]["agent_version"] = "not-a-version"
    with pytest.raises(ValidationFailed) as caught:
        parse_batch(batch_body(*events))
    assert [e.field for e in caught.value.errors] == ["events[3].payload.agent_version"]
    assert "pattern" in caught.value.errors[0].message


def test_several_errors_are_all_listed_without_echoing_input() -> None:
    bad = heartbeat("e1", health="on fire <script>")
    bad["customer_id"] = "someone-else"
    wrong_type = {"id": "e2", "boot_id": "b", "seq": 1, "type": "reboot", "payload": {}}
    with pytest.raises(ValidationFailed) as caught:
        parse_batch(batch_body(bad, wrong_type, observed("e3", [{"name": "a"}])))
    fields = {e.field for e in caught.value.errors}
    assert {
        "events[0].customer_id",
        "events[0].payload.health",
        "events[1].type",
        "events[2].payload.resources[0].kind",
        "events[2].payload.resources[0].version",
    } <= fields
    assert "on fire" not in json.dumps([e.message for e in caught.value.errors])


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe", b'{"events": [}'])
def test_malformed_json_is_a_400(body: bytes) -> None:
    with pytest.raises(MalformedRequest, match="not valid JSON"):
        parse_batch(body)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"[]", "$"),
        (b'{"events": []}', "events"),
        (batch_body(*[heartbeat(f"e{i}") for i in range(MAX_EVENTS_PER_BATCH + 1)]), "events"),
        (b'{"events": [1]}', "events[0]"),
        (b'{"events": [{"id": "e1", "boot_id": "b", "seq": "1", "type": "heartbeat",'
         b' "payload": {"agent_version": "1.0.0", "health": "ok"}}]}', "events[0].seq"),
    ],
    ids=["not-object", "empty", "too-many", "not-event", "string-seq"],
)  # fmt: skip
def test_structural_errors_are_422(body: bytes, field: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_batch(body)
    assert field in [e.field for e in caught.value.errors]


def test_duplicate_ids_in_a_batch_are_422() -> None:
    with pytest.raises(ValidationFailed, match="unique") as caught:
        parse_batch(batch_body(heartbeat("a"), heartbeat("b"), heartbeat("a"), heartbeat("a")))
    assert caught.value.errors == (
        FieldError("events[2].id", "duplicate of events[0].id"),
        FieldError("events[3].id", "duplicate of events[0].id"),
    )


def test_problem_body_is_rfc9457_with_errors_capped() -> None:
    errors = tuple(FieldError(f"events[{i}].id", "bad") for i in range(MAX_LISTED_ERRORS + 5))
    body = problem_body(ValidationFailed("bad batch", errors=errors), request_id="r1")
    assert body["type"] == "urn:fleetplane:problem:validation-failed"
    assert (body["title"], body["status"], body["detail"]) == (
        "Request failed validation",
        422,
        "bad batch",
    )
    assert len(body["errors"]) == MAX_LISTED_ERRORS
    assert body["errors"][0] == {"field": "events[0].id", "message": "bad"}
    assert body["errors_truncated"] is True
    assert body["request_id"] == "r1"


def test_problem_without_errors_has_no_errors_member() -> None:
    problem = ServiceUnavailable("later", retry_after_s=3)
    assert "errors" not in problem_body(problem)
    assert problem.headers == {"Retry-After": "3"}


def test_http_problem_body_for_routing_errors() -> None:
    body = http_problem_body(405, "use GET")
    assert body == {
        "type": "urn:fleetplane:problem:method-not-allowed",
        "title": "Method Not Allowed",
        "status": 405,
        "detail": "use GET",
    }

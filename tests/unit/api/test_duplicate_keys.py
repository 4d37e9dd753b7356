"""A JSON object that repeats a key is refused with 400, before any model sees it."""

from __future__ import annotations

import pytest

from services.api.service import parse_batch, parse_desired_state
from services.shared.jsonbody import DuplicateKey, refuse_duplicate_keys
from services.shared.problems import MalformedRequest

from .conftest import AGENT, JSON, Client, FakeProducer, problem
from .events_data import batch_body, heartbeat

HEARTBEAT = batch_body(heartbeat("e1", 1)).decode()


@pytest.mark.parametrize(
    "body",
    [
        # The same field twice inside an event: the last value would win silently.
        HEARTBEAT.replace('"seq": 1', '"seq": 1, "seq": 2'),
        HEARTBEAT.replace('"health": "ok"', '"health": "ok", "health": "failing"'),
        # At the top level, and spelled differently but equal once unescaped.
        HEARTBEAT[:-1] + ', "events": []}',
        HEARTBEAT.replace('"seq": 1', '"seq": 1, "\\u0073eq": 1'),
    ],
    ids=["event-field", "payload-field", "top-level", "escaped-spelling"],
)
def test_a_batch_repeating_a_key_is_refused(body: str) -> None:
    assert body != HEARTBEAT
    with pytest.raises(DuplicateKey) as caught:
        parse_batch(body.encode())
    assert caught.value.status == 400
    # Nothing of the input is echoed.
    assert "failing" not in caught.value.detail
    assert "seq" not in caught.value.detail


def test_the_same_key_in_different_objects_is_fine() -> None:
    batch = parse_batch(batch_body(heartbeat("e1", 1), heartbeat("e2", 2)))
    assert [event.id for event in batch.events] == ["e1", "e2"]


def test_a_desired_state_repeating_a_key_is_refused() -> None:
    body = b'{"revision": 1, "revision": 2, "resources": []}'
    with pytest.raises(DuplicateKey):
        parse_desired_state(body)


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe", b'{"a": NaN', b"[1, 2"])
def test_a_body_that_is_not_json_is_left_to_the_parser(body: bytes) -> None:
    refuse_duplicate_keys(body)
    with pytest.raises(MalformedRequest, match="not valid JSON"):
        parse_batch(body)


def test_nesting_beyond_the_recursion_limit_is_refused() -> None:
    with pytest.raises(MalformedRequest, match="too deeply"):
        refuse_duplicate_keys(b"[" * 100_000 + b"]" * 100_000)


async def test_the_api_answers_400_with_a_problem(edge: Client, producer: FakeProducer) -> None:
    body = HEARTBEAT.replace('"seq": 1', '"seq": 1, "seq": 2').encode()
    response = await edge.post("/v1/events", data=body, headers=AGENT | JSON)
    answer = await problem(response, 400)
    assert answer["type"].endswith("duplicate-json-key")
    assert producer.sent == []

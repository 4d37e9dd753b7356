"""Invariant 2 in the service: 202 only after every ack, 503 with Retry-After within 5 s."""

from __future__ import annotations

import asyncio
import functools
import re
import time
from datetime import UTC, datetime

import pytest
from aiokafka.errors import KafkaConnectionError, UnknownTopicOrPartitionError

from services.api.metrics import ApiMetrics
from services.api.service import (
    EventService,
    build_desired_state_record,
    build_records,
    encode_records,
    parse_batch,
    parse_desired_state,
)
from services.shared.events import (
    AgentEventRecord,
    DesiredStateRecord,
    HeartbeatEvent,
    decode_topic_record,
)
from services.shared.identity import AgentIdentity
from services.shared.problems import (
    MalformedRequest,
    PayloadTooLarge,
    ServiceUnavailable,
    ValidationFailed,
)

from .conftest import FakeProducer
from .events_data import batch_body, heartbeat, observed

IDENTITY = AgentIdentity("acme", "prod", "agent-1")
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def service(
    producer: FakeProducer, *, timeout_s: float = 0.3, metrics: ApiMetrics | None = None
) -> EventService:
    return EventService(
        producer=producer,
        topic="test.events",
        produce_timeout_s=timeout_s,
        retry_after_s=2,
        metrics=metrics or ApiMetrics.create(),
        clock=lambda: NOW,
    )


def test_records_carry_the_verified_identity_in_batch_order() -> None:
    batch = parse_batch(batch_body(heartbeat("e1", 1), observed("e2", []), heartbeat("e3", 3)))
    records = build_records(batch, IDENTITY, accepted_at=NOW, request_id="req-1")
    assert [r.event.id for r in records] == ["e1", "e2", "e3"]
    for record in records:
        assert (record.customer_id, record.environment_id, record.agent_id) == (
            "acme",
            "prod",
            "agent-1",
        )
        assert (record.accepted_at, record.request_id) == (NOW, "req-1")
        assert decode_topic_record(record.model_dump_json().encode()) == record


@pytest.mark.parametrize("request_id", ["req-1", None])
def test_encoded_records_are_byte_for_byte_the_models_json(request_id: str | None) -> None:
    batch = parse_batch(
        batch_body(
            heartbeat("e1", 1),
            observed("e2", [{"name": "web", "kind": "app", "version": "1.0", "status": "ü\\"}]),
            {
                "id": "e3",
                "boot_id": "boot-1",
                "seq": 3,
                "type": "command_result",
                "payload": {"command_id": 7, "epoch": 2, "outcome": "failed", "message": "\u2028"},
            },
            heartbeat("e4", 4),
        )
    )
    for accepted_at in (NOW, datetime(2026, 1, 2, 3, 4, 5, 120000, tzinfo=UTC)):
        records = build_records(batch, IDENTITY, accepted_at=accepted_at, request_id=request_id)
        assert encode_records(batch, IDENTITY, accepted_at=accepted_at, request_id=request_id) == [
            r.model_dump_json().encode() for r in records
        ]


async def test_accept_produces_one_keyed_record_per_event_and_returns_ids() -> None:
    producer = FakeProducer()
    metrics = ApiMetrics.create()
    accepted = await service(producer, metrics=metrics).accept(
        batch_body(heartbeat("e1", 1), heartbeat("e2", 2)),
        IDENTITY,
        request_id="req-1",
        trace_carrier={"traceparent": TRACEPARENT},
    )
    assert accepted == ["e1", "e2"]
    assert [(s.topic, s.key) for s in producer.sent] == [("test.events", b"acme")] * 2
    record = decode_topic_record(producer.sent[1].value)
    assert isinstance(record, AgentEventRecord)
    assert isinstance(record.event, HeartbeatEvent)
    assert (record.customer_id, record.agent_id, record.event.seq) == ("acme", "agent-1", 2)
    assert record.request_id == "req-1"
    # No tracer provider is configured, so the incoming context passes through.
    assert producer.sent[0].headers == [("traceparent", TRACEPARENT.encode())]
    accepted_total = metrics.registry.get_sample_value(
        "fleetplane_api_events_accepted_total", {"type": "heartbeat"}
    )
    assert accepted_total == 2


async def test_no_trace_header_without_incoming_trace_context() -> None:
    producer = FakeProducer()
    await service(producer).accept(
        batch_body(heartbeat("e1")), IDENTITY, request_id=None, trace_carrier={}
    )
    assert producer.sent[0].headers == []


async def test_refused_batch_produces_nothing() -> None:
    producer = FakeProducer()
    with pytest.raises(ValidationFailed):
        await service(producer).accept(
            batch_body(heartbeat("e1"), heartbeat("e1")),
            IDENTITY,
            request_id=None,
            trace_carrier={},
        )
    assert producer.sent == []


async def test_record_too_large_for_kafka_is_413_before_anything_is_sent() -> None:
    producer = FakeProducer()
    resources = [
        {"name": f"r{i}", "kind": "app", "version": "1", "status": "x" * 2048} for i in range(500)
    ]
    body = batch_body(heartbeat("e0"), observed("e1", resources))
    with pytest.raises(PayloadTooLarge, match=r"events\[1\]"):
        await service(producer).accept(body, IDENTITY, request_id=None, trace_carrier={})
    assert producer.sent == []


@pytest.mark.parametrize(
    "producer",
    [
        FakeProducer(send_error=KafkaConnectionError("down")),
        FakeProducer(send_error=UnknownTopicOrPartitionError()),
        FakeProducer(on_send="fail"),
        FakeProducer(on_send="hang"),
        FakeProducer(send_blocks=True),
    ],
    ids=["send-raises", "no-metadata", "ack-fails", "ack-never-comes", "send-blocks"],
)
async def test_kafka_trouble_is_503_with_retry_after_in_time(producer: FakeProducer) -> None:
    metrics = ApiMetrics.create()
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        await service(producer, timeout_s=0.3, metrics=metrics).accept(
            batch_body(heartbeat("e1"), heartbeat("e2")),
            IDENTITY,
            request_id=None,
            trace_carrier={},
        )
    assert time.monotonic() - started < 1.0
    assert caught.value.headers == {"Retry-After": "2"}
    assert caught.value.retry_after_s == 2
    assert "retry the same batch" in caught.value.detail
    assert metrics.registry.get_sample_value("fleetplane_api_kafka_unavailable_total") == 1
    assert metrics.registry.get_sample_value("fleetplane_api_events_accepted_total") is None
    # Only the request's own wait ends: its batch is left to the producer, which
    # gives it up itself (services.api.kafka); nothing else is dropped.
    assert not any(f.cancelled() for f in producer.futures)


async def test_one_failed_ack_fails_the_whole_batch() -> None:
    # Three records in two producer batches; the second batch fails.
    producer = FakeProducer(fail_index=2, batch_records=2)
    with pytest.raises(ServiceUnavailable):
        await service(producer).accept(
            batch_body(heartbeat("e1"), heartbeat("e2"), heartbeat("e3")),
            IDENTITY,
            request_id=None,
            trace_carrier={},
        )
    assert len(producer.sent) == 3
    assert [len(b) for b in producer.batches] == [2, 1]


async def test_a_request_is_one_batch_of_its_own_records() -> None:
    producer = FakeProducer()
    events = [heartbeat(f"e{i}", i) for i in range(1, 21)]
    await service(producer).accept(batch_body(*events), IDENTITY, request_id=None, trace_carrier={})
    await service(producer).accept(
        batch_body(heartbeat("f1")), IDENTITY, request_id=None, trace_carrier={}
    )
    assert [len(b) for b in producer.batches] == [20, 1]


async def test_a_failed_or_timed_out_request_touches_no_other_request() -> None:
    hung = FakeProducer(on_send="hang")
    shared_metrics = ApiMetrics.create()
    slow = service(hung, metrics=shared_metrics)
    waiting = asyncio.ensure_future(
        slow.accept(batch_body(heartbeat("s1")), IDENTITY, request_id=None, trace_carrier={})
    )
    await hung.queued.wait()  # that request's batch is queued
    # While that one waits, the broker answers the next request's batch.
    hung.on_send = "ack"
    assert await slow.accept(
        batch_body(heartbeat("a1")), IDENTITY, request_id=None, trace_carrier={}
    ) == ["a1"]
    with pytest.raises(ServiceUnavailable):
        await waiting
    # The timed-out request's batch is still the producer's: not cancelled, and the
    # other request's batch was answered.
    assert [f.done() for f in hung.futures] == [False, True]
    assert not hung.futures[0].cancelled()


async def test_default_timeout_answers_within_five_seconds_when_the_broker_is_gone() -> None:
    # The production default, with send() blocked as aiokafka blocks on missing metadata.
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        await service(FakeProducer(send_blocks=True), timeout_s=4.0).accept(
            batch_body(heartbeat("e1")), IDENTITY, request_id=None, trace_carrier={}
        )
    assert time.monotonic() - started < 5.0


# --- operator changes: the same produce path -------------------------------------

DESIRED = b'{"revision": 4, "resources": [{"kind": "app", "name": "web", "version": "2.0"}]}'


async def test_desired_state_is_one_record_keyed_by_customer() -> None:
    producer = FakeProducer()
    record = await service(producer).accept_desired_state(
        DESIRED,
        customer_id="acme",
        environment_id="prod",
        operator="0123456789ab",
        request_id="req-9",
        trace_carrier={"traceparent": TRACEPARENT},
    )
    assert [(s.topic, s.key) for s in producer.sent] == [("test.events", b"acme")]
    assert producer.sent[0].headers == [("traceparent", TRACEPARENT.encode())]
    decoded = decode_topic_record(producer.sent[0].value)
    assert decoded == record
    assert isinstance(decoded, DesiredStateRecord)
    assert (decoded.customer_id, decoded.environment_id, decoded.operator) == (
        "acme",
        "prod",
        "0123456789ab",
    )
    assert (decoded.accepted_at, decoded.request_id, decoded.desired.revision) == (NOW, "req-9", 4)
    assert re.fullmatch(r"[0-9a-f]{32}", decoded.change_id)


def test_change_ids_are_unique_and_can_be_given() -> None:
    desired = parse_desired_state(DESIRED)
    build = functools.partial(
        build_desired_state_record,
        desired,
        customer_id="acme",
        environment_id="prod",
        operator="k",
        accepted_at=NOW,
        request_id=None,
    )
    assert len({build().change_id for _ in range(100)}) == 100
    assert build(change_id="fixed").change_id == "fixed"


async def test_desired_state_when_kafka_is_down_is_503_and_dropped() -> None:
    producer = FakeProducer(send_blocks=True)
    with pytest.raises(ServiceUnavailable) as caught:
        await service(producer).accept_desired_state(
            DESIRED,
            customer_id="acme",
            environment_id="prod",
            operator="k",
            request_id=None,
            trace_carrier={},
        )
    assert "retry the change with the same revision" in caught.value.detail
    assert producer.sent == []


@pytest.mark.parametrize(
    ("body", "problem", "field"),
    [
        (b"[", MalformedRequest, None),
        (b'{"revision": 1}', ValidationFailed, "resources"),
        (b'{"revision": 1, "resources": [], "extra": 1}', ValidationFailed, "extra"),
        (b'{"revision": 1.5, "resources": []}', ValidationFailed, "revision"),
    ],
)
def test_desired_state_validation(body: bytes, problem: type[Exception], field: str | None) -> None:
    with pytest.raises(problem) as caught:
        parse_desired_state(body)
    if field is not None:
        assert isinstance(caught.value, ValidationFailed)
        assert [e.field for e in caught.value.errors] == [field]

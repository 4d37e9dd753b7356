"""Accepting agent events and operator changes: validate, stamp, produce, wait for the broker.

Plain asyncio and pydantic, no aiohttp: the handler hands over the raw body and
the edge-verified identity (or the verified operator key), and gets back what was
accepted or a Problem. Both kinds of record travel on the events topic keyed by
customer id and go through the same produce path (``EventService.publish``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from aiokafka.errors import KafkaError
from opentelemetry import propagate, trace
from pydantic import ValidationError

from services.api.metrics import ApiMetrics
from services.shared.events import (
    AgentEvent,
    AgentEventRecord,
    DesiredState,
    DesiredStateRecord,
    EventBatch,
)
from services.shared.identity import AgentIdentity
from services.shared.jsonbody import refuse_duplicate_keys
from services.shared.problems import (
    FieldError,
    PayloadTooLarge,
    ServiceUnavailable,
    ValidationFailed,
)
from services.shared.web.body import body_problem as _body_problem
from services.shared.web.body import field_path as field_path
from services.shared.web.body import validation_errors as validation_errors

log = logging.getLogger(__name__)

# Kafka's default broker limit (message.max.bytes) is 1048588 bytes per record
# batch; a record above this could never be delivered, so it is refused up front
# instead of being answered 503 and retried forever.
MAX_RECORD_BYTES: Final = 1_000_000
_TRACE_HEADERS: Final = ("traceparent", "tracestate")

KafkaHeaders = list[tuple[str, bytes]]


class RecordProducer(Protocol):
    """The part of a Kafka producer the API uses (``kafka.KafkaRecordProducer`` in production)."""

    async def send_batch(
        self, topic: str, *, key: bytes, values: Sequence[bytes], headers: KafkaHeaders
    ) -> list[asyncio.Future[Any]]:
        """Queue a record per value, in order, on ``key``'s partition.

        Returns futures resolving when the broker acknowledged every record, or
        failing with a KafkaError. Records of concurrent calls may share batches;
        a failure of a shared batch is retried call by call, so a refusal fails
        only the calls whose own records Kafka refuses, and a call that stops
        waiting (cancels its futures) is left out of any batch not yet sent. May
        block while topic metadata is unknown; raises KafkaError when the records
        cannot be queued.
        """
        ...

    async def check(self, topic: str, timeout_s: float) -> None:
        """Return when a broker answered a metadata request listing ``topic``.

        Raises KafkaError or TimeoutError otherwise, within about ``timeout_s``.
        """
        ...


def parse_batch(body: bytes) -> EventBatch:
    """Parse and validate a ``POST /v1/events`` body.

    Raises MalformedRequest when the body is not JSON or an object in it repeats
    a key (``DuplicateKey``), ValidationFailed (with one error per invalid
    field, or per repeated event id) when it is not a valid batch.
    """
    refuse_duplicate_keys(body)
    try:
        batch = EventBatch.model_validate_json(body)
    except ValidationError as e:
        raise _body_problem(e, "batch", body, EventBatch) from e
    duplicates = duplicate_id_errors(batch)
    if duplicates:
        raise ValidationFailed(
            "event ids must be unique within a batch; nothing was accepted", errors=duplicates
        )
    return batch


def duplicate_id_errors(batch: EventBatch) -> tuple[FieldError, ...]:
    """One error per event whose id an earlier event of the same batch already used."""
    first_index: dict[str, int] = {}
    errors: list[FieldError] = []
    for index, event in enumerate(batch.events):
        first = first_index.setdefault(event.id, index)
        if first != index:
            errors.append(FieldError(f"events[{index}].id", f"duplicate of events[{first}].id"))
    return tuple(errors)


def build_records(
    batch: EventBatch,
    identity: AgentIdentity,
    *,
    accepted_at: datetime,
    request_id: str | None,
) -> list[AgentEventRecord]:
    """One topic record per event, in batch order, stamped with the edge-verified identity."""
    return [_record(identity, event, accepted_at, request_id) for event in batch.events]


def _record(
    identity: AgentIdentity, event: AgentEvent, accepted_at: datetime, request_id: str | None
) -> AgentEventRecord:
    return AgentEventRecord(
        customer_id=identity.customer_id,
        environment_id=identity.environment_id,
        agent_id=identity.agent_id,
        accepted_at=accepted_at,
        request_id=request_id,
        event=event,
    )


def parse_desired_state(body: bytes) -> DesiredState:
    """Parse and validate a desired-state body (strict, like an event batch).

    Raises MalformedRequest when the body is not JSON or repeats a key in an
    object, ValidationFailed (one error per invalid field; ``$`` for a
    cross-field rule such as repeated resources) otherwise.
    """
    refuse_duplicate_keys(body)
    try:
        return DesiredState.model_validate_json(body)
    except ValidationError as e:
        raise _body_problem(e, "desired state", body, DesiredState) from e


def build_desired_state_record(
    desired: DesiredState,
    *,
    customer_id: str,
    environment_id: str,
    operator: str,
    accepted_at: datetime,
    request_id: str | None,
    change_id: str | None = None,
) -> DesiredStateRecord:
    """The topic record of one operator change; ``change_id`` defaults to a new uuid4 hex.

    ``customer_id`` and ``environment_id`` must already be valid ids (the record
    validates them again and raises pydantic.ValidationError otherwise).
    """
    return DesiredStateRecord(
        change_id=change_id or uuid.uuid4().hex,
        customer_id=customer_id,
        environment_id=environment_id,
        operator=operator,
        accepted_at=accepted_at,
        request_id=request_id,
        desired=desired,
    )


def encode_records(
    batch: EventBatch,
    identity: AgentIdentity,
    *,
    accepted_at: datetime,
    request_id: str | None,
) -> list[bytes]:
    """Each event's topic record as JSON, in batch order: ``build_records``, serialised.

    Byte for byte what ``AgentEventRecord.model_dump_json()`` writes, without a
    model per event: every record of a request shares its envelope (identity,
    time, request id), and the event is the record's last field, so the envelope
    is serialised once and each event's JSON is put inside it. Raises
    PayloadTooLarge, before anything is produced, if a record exceeds
    MAX_RECORD_BYTES.
    """
    events = batch.events
    first = events[0].model_dump_json().encode()
    whole = _record(identity, events[0], accepted_at, request_id).model_dump_json().encode()
    # '...,"event":' + first + '}': a different layout would be a pydantic change
    # that the byte-for-byte test of this function catches.
    envelope = whole[: len(whole) - len(first) - 1]
    values = [whole]
    values.extend(envelope + event.model_dump_json().encode() + b"}" for event in events[1:])
    for index, value in enumerate(values):
        if len(value) > MAX_RECORD_BYTES:
            raise PayloadTooLarge(
                f"event events[{index}] is {len(value)} bytes as a record, above the "
                f"{MAX_RECORD_BYTES}-byte limit; split its payload across several events"
            )
    return values


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class EventService:
    """Accepts agent batches and operator changes, answering only after Kafka acknowledged."""

    producer: RecordProducer
    topic: str
    produce_timeout_s: float
    retry_after_s: int
    metrics: ApiMetrics
    clock: Callable[[], datetime] = field(default=_utc_now)
    # Read once when the service is built (at app start, after any provider was
    # installed): get_tracer_provider() per request costs more than the rest of
    # the no-tracing path.
    tracing: bool = field(default_factory=lambda: tracing_configured())

    async def accept(
        self,
        body: bytes,
        identity: AgentIdentity,
        *,
        request_id: str | None,
        trace_carrier: Mapping[str, str],
    ) -> list[str]:
        """Validate ``body``, produce one record per event, return the event ids in order.

        Returns only after Kafka acknowledged every record (acks=all). Raises
        MalformedRequest, ValidationFailed or PayloadTooLarge before producing
        anything; ServiceUnavailable (with retry_after_s) when Kafka did not
        acknowledge within produce_timeout_s. The request's records travel as a
        batch of their own, which the producer gives up (fails rather than retries)
        once older than its request timeout, half of produce_timeout_s, so they are
        not delivered long after the agent's retry; no other request's records are
        touched (a record the broker wrote but did not acknowledge in time can still
        exist: the retry reuses its id and the controller deduplicates).
        ``trace_carrier`` holds the request's W3C trace headers, if any.
        """
        batch = parse_batch(body)
        values = encode_records(batch, identity, accepted_at=self.clock(), request_id=request_id)
        await self.publish(
            identity.customer_id.encode(),
            values,
            trace_carrier=trace_carrier,
            retry_hint="retry the same batch with the same event ids",
        )
        self.metrics.count_accepted(event.type for event in batch.events)
        return [event.id for event in batch.events]

    async def accept_desired_state(
        self,
        body: bytes,
        *,
        customer_id: str,
        environment_id: str,
        operator: str,
        request_id: str | None,
        trace_carrier: Mapping[str, str],
    ) -> DesiredStateRecord:
        """Validate an operator's desired state and produce it as one record, keyed by customer.

        Returns the produced record once Kafka acknowledged it. Raises like
        ``accept``: MalformedRequest or ValidationFailed before producing anything,
        ServiceUnavailable when Kafka did not acknowledge in time (the operator
        retries; the controller ignores a revision that is not above the current one).
        """
        desired = parse_desired_state(body)
        record = build_desired_state_record(
            desired,
            customer_id=customer_id,
            environment_id=environment_id,
            operator=operator,
            accepted_at=self.clock(),
            request_id=request_id,
        )
        value = record.model_dump_json().encode()
        # A valid DesiredState is at most a few hundred kB; checked anyway so a
        # future limit change fails loudly here rather than as endless 503s.
        if len(value) > MAX_RECORD_BYTES:
            raise PayloadTooLarge(
                f"the change is {len(value)} bytes as a record, above the "
                f"{MAX_RECORD_BYTES}-byte limit"
            )
        await self.publish(
            customer_id.encode(),
            [value],
            trace_carrier=trace_carrier,
            retry_hint="retry the change with the same revision",
        )
        return record

    async def publish(
        self,
        key: bytes,
        values: list[bytes],
        *,
        trace_carrier: Mapping[str, str],
        retry_hint: str,
    ) -> None:
        """Produce a record per value, in order, keyed ``key``; return once Kafka acknowledged all.

        The records carry the request's W3C trace context in their headers. With a
        tracer provider configured this runs in a PRODUCER span continuing
        ``trace_carrier``, whose context the records carry; without one (no
        exporter), the incoming context passes through as it is, with no span
        work. Raises ServiceUnavailable (detail ends with ``retry_hint``) when
        Kafka did not acknowledge within produce_timeout_s; only this request's
        records are given up (see ``accept``).
        """
        if not self.tracing:
            await self._produce(key, values, passed_through(trace_carrier), retry_hint=retry_hint)
            return
        tracer = trace.get_tracer(__name__)
        with tracer.start_as_current_span(
            "fleetplane.events publish",
            context=propagate.extract(dict(trace_carrier)),
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": self.topic,
                "messaging.batch.message_count": len(values),
            },
        ):
            outgoing: dict[str, str] = {}
            propagate.inject(outgoing)
            await self._produce(key, values, _trace_headers(outgoing), retry_hint=retry_hint)

    async def _produce(
        self, key: bytes, values: list[bytes], headers: KafkaHeaders, *, retry_hint: str
    ) -> None:
        async def send_all() -> None:
            futures = await self.producer.send_batch(
                self.topic, key=key, values=values, headers=headers
            )
            # Raises the first failure; on the deadline, cancelling this wait leaves
            # this request's records out of any batch not yet sent.
            if len(futures) == 1:
                await futures[0]
            else:
                await asyncio.gather(*futures)

        started = time.perf_counter()
        try:
            # send_batch() itself waits for topic metadata (up to the producer's own
            # request timeout) when the broker is down, so the deadline must cover
            # it too, not only the delivery futures. asyncio.timeout, unlike
            # wait_for, runs the wait in this task rather than a new one.
            async with asyncio.timeout(self.produce_timeout_s):
                await send_all()
        except (TimeoutError, KafkaError) as e:
            self.metrics.kafka_unavailable.inc()
            log.warning(
                "Kafka did not acknowledge a batch of %d record(s): %s",
                len(values),
                type(e).__name__ if isinstance(e, TimeoutError) else e,
            )
            raise ServiceUnavailable(
                f"Kafka did not acknowledge the request within {self.produce_timeout_s:g} s; "
                f"{retry_hint}",
                retry_after_s=self.retry_after_s,
            ) from e
        self.metrics.produce_duration.observe(time.perf_counter() - started)


def tracing_configured() -> bool:
    """Whether a tracer provider was installed (the API installs one only with an exporter)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _trace_headers(carrier: Mapping[str, str]) -> KafkaHeaders:
    return [(name, carrier[name].encode()) for name in _TRACE_HEADERS if name in carrier]


def passed_through(trace_carrier: Mapping[str, str]) -> KafkaHeaders:
    """The incoming W3C trace context as record headers, as propagation without a span
    would write it: nothing without a valid ``traceparent``."""
    if "traceparent" not in trace_carrier:
        return []
    outgoing: dict[str, str] = {}
    propagate.inject(outgoing, context=propagate.extract(dict(trace_carrier)))
    return _trace_headers(outgoing)

"""Versioned event contracts: what agents send and what travels on Kafka.

The API validates agent input against these models before producing anything;
the controller validates again on consume, so a record that reached the topic by
another route (a bug, a manual produce) becomes a dead letter instead of a crash.

Structured fields (ids, types, sequence numbers, versions) have strict patterns
and lengths. Free-text fields (messages, statuses) are data: length-limited,
never interpreted, stored only through parameterised SQL.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, model_validator

from services.shared.identity import ID_PATTERN

MAX_EVENTS_PER_BATCH: Final = 500
MAX_RESOURCES_PER_REPORT: Final = 1000


def _whole_number(value: object) -> object:
    """2.0 as 2: JSON does not tell them apart, and JSON Schema's ``integer`` (what the
    OpenAPI document promises) accepts both, but a strict int field refuses a float."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber: Final = BeforeValidator(_whole_number)
"""On every integer field of a request contract, after its Field (a constraint placed
after a validator is left out of the JSON schema as an unknown keyword)."""

EventId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
BootId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
Sequence = Annotated[int, Field(ge=0, le=2**53), WholeNumber]
Epoch = Annotated[int, Field(ge=0, le=2**62), WholeNumber]
Identifier = Annotated[str, Field(pattern=ID_PATTERN)]
# Slash-separated segments that each start with a letter or digit, so no segment
# is "." or "..": the agent WAF does not read bodies, the schema is the defence.
ResourceName = Annotated[
    str,
    Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*$", max_length=128),
]
ResourceKind = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
Version = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")]
AgentVersion = Annotated[
    str, Field(pattern=r"^\d{1,6}\.\d{1,6}\.\d{1,6}([-+][0-9A-Za-z.-]{1,32})?$")
]
FreeText = Annotated[str, Field(max_length=2048)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class HeartbeatPayload(_Strict):
    agent_version: AgentVersion
    health: Literal["ok", "degraded", "failing"]
    message: FreeText = ""


class ObservedResource(_Strict):
    name: ResourceName
    kind: ResourceKind
    version: Version
    status: FreeText = ""


class ObservedStatePayload(_Strict):
    resources: Annotated[list[ObservedResource], Field(max_length=MAX_RESOURCES_PER_REPORT)]


class CommandResultPayload(_Strict):
    command_id: Annotated[int, Field(ge=1, le=2**62), WholeNumber]
    epoch: Epoch
    outcome: Literal["succeeded", "failed"]
    message: FreeText = ""


class _EventBase(_Strict):
    id: EventId
    boot_id: BootId
    seq: Sequence


class HeartbeatEvent(_EventBase):
    type: Literal["heartbeat"]
    payload: HeartbeatPayload


class ObservedStateEvent(_EventBase):
    type: Literal["observed_state"]
    payload: ObservedStatePayload


class CommandResultEvent(_EventBase):
    type: Literal["command_result"]
    payload: CommandResultPayload


AgentEvent = Annotated[
    HeartbeatEvent | ObservedStateEvent | CommandResultEvent, Field(discriminator="type")
]
EVENT_TYPES: Final = ("heartbeat", "observed_state", "command_result")


class EventBatch(_Strict):
    """The body of ``POST /v1/events``."""

    events: Annotated[list[AgentEvent], Field(min_length=1, max_length=MAX_EVENTS_PER_BATCH)]


class AgentEventRecord(_Strict):
    """One accepted agent event as it travels on the events topic (key = customer id).

    The identity fields come from the verified client certificate, never from the
    agent's body.
    """

    # strict=False: JSON carries datetimes as strings, and the record is parsed
    # from JSON by the controller.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    schema_version: Literal[1] = 1
    kind: Literal["agent_event"] = "agent_event"
    customer_id: Identifier
    environment_id: Identifier
    agent_id: Identifier
    accepted_at: datetime
    request_id: Annotated[str, Field(max_length=128)] | None = None
    event: AgentEvent


class DesiredResource(_Strict):
    kind: ResourceKind
    name: ResourceName
    version: Version


class DesiredState(_Strict):
    """The body of an operator's desired-state change for one environment.

    ``revision`` must grow with every change; the controller ignores a change whose
    revision is not above the environment's current one (stale or replayed).
    """

    revision: Annotated[int, Field(ge=1, le=2**53), WholeNumber]
    resources: Annotated[list[DesiredResource], Field(max_length=MAX_RESOURCES_PER_REPORT)]

    @model_validator(mode="after")
    def _unique_resources(self) -> DesiredState:
        keys = [(r.kind, r.name) for r in self.resources]
        if len(keys) != len(set(keys)):
            raise ValueError("resources must be unique by (kind, name)")
        return self


class DesiredStateRecord(_Strict):
    """An operator's desired-state change on the events topic (key = customer id)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    schema_version: Literal[1] = 1
    kind: Literal["desired_state"] = "desired_state"
    change_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
    customer_id: Identifier
    environment_id: Identifier
    operator: Annotated[str, Field(min_length=1, max_length=128)]
    """Who made the change: the operator key's id, for the audit record."""
    accepted_at: datetime
    request_id: Annotated[str, Field(max_length=128)] | None = None
    desired: DesiredState


TopicRecord = Annotated[AgentEventRecord | DesiredStateRecord, Field(discriminator="kind")]
TOPIC_RECORD: Final[TypeAdapter[TopicRecord]] = TypeAdapter(TopicRecord)


def decode_topic_record(raw: bytes) -> TopicRecord:
    """Parse one record value from the events topic.

    Raises pydantic.ValidationError for anything that is not a valid record.
    """
    return TOPIC_RECORD.validate_json(raw)

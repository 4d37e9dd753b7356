"""Versioned event contracts: what agents send and what travels on Kafka.

The API validates agent input against these models before producing anything;
the controller validates again on consume, so a record that reached the topic by
another route (a bug, a manual produce) becomes a dead letter instead of a crash.

Structured fields (ids, types, sequence numbers, versions) have strict patterns
and lengths. Free-text fields (messages, statuses) are data: length-limited,
never interpreted, stored only through parameterised SQL.

Every value these contracts accept can be stored where the controller writes it
(docs/architecture.md, "What PostgreSQL can store"): a value PostgreSQL would refuse
is refused here, with 422 naming the field, never as a surprise in the apply
transaction. The classes, checked against PostgreSQL 15:

- text and jsonb strings cannot hold U+0000 (``text`` has no NUL; ``jsonb`` refuses
  the ``\u0000`` escape with 22P05): refused in every free-text field
  (``StorableText``); structured fields are ASCII patterns that exclude it;
- unpaired UTF-16 surrogates (``\ud800``) have no UTF-8 form: pydantic refuses
  them in every string field (the API names the field, ``services.api.service``);
- integers are bounded below bigint (``seq``, ``revision`` at 2**53, ids and
  epochs at 2**62); no field is a float, so NaN, Infinity and numbers beyond
  numeric's range never reach jsonb;
- indexed text columns (event ids, resource names, change ids) are ASCII and at
  most 128 characters, far below the btree row limit (2704 bytes);
- jsonb documents (observed and desired state) are lists of at most 1000 flat
  objects of strings, bounded by the body limit (1 MiB) far below jsonb's 255 MB;
- instants are time-zone aware and within years 2..9998, so they read back as
  Python datetimes in any session time zone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Final, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    model_validator,
)
from pydantic_core import PydanticCustomError

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
# [0-9], not \d: pydantic's regex engine reads \d as any Unicode digit, the
# document's ECMA-262 pattern as ASCII only.
AgentVersion = Annotated[
    str, Field(pattern=r"^[0-9]{1,6}\.[0-9]{1,6}\.[0-9]{1,6}([-+][0-9A-Za-z.-]{1,32})?$")
]

NUL_FREE_PATTERN: Final = r"^[^\u0000]*$"
"""The JSON Schema form of ``StorableText``'s rule (ECMA-262: no U+0000 anywhere)."""
UNSTORABLE_NUL: Final = "must not contain U+0000 (NUL): PostgreSQL text and jsonb cannot store it"
UNSTORABLE_SURROGATE: Final = (
    "must not contain an unpaired UTF-16 surrogate escape (\\ud800-\\udfff): "
    "it has no UTF-8 form, so PostgreSQL cannot store it"
)
STORABLE_TEXT_RULE: Final = (
    "Any Unicode text except U+0000 (NUL) and unpaired surrogate escapes "
    "(\\ud800-\\udfff not forming a pair), which PostgreSQL cannot store; refused with 422."
)


def _storable_text(value: str) -> str:
    # pydantic has already refused unpaired surrogates (string_unicode): a Python
    # str holding one cannot be read as UTF-8.
    if "\x00" in value:
        # A custom error, not ValueError: its message is answered as it is, without
        # pydantic's "Value error, " prefix.
        raise PydanticCustomError("string_unstorable", UNSTORABLE_NUL)
    return value


StorableText: Final = AfterValidator(_storable_text)
"""On every string field whose value is not held to an ASCII pattern. Its Field states
``NUL_FREE_PATTERN`` in the document only (json_schema_extra), so the check and its
message are this validator's."""

FreeText = Annotated[
    str,
    Field(
        max_length=2048,
        description=f"Free text, at most 2048 characters. {STORABLE_TEXT_RULE}",
        json_schema_extra={"pattern": NUL_FREE_PATTERN},
    ),
    StorableText,
]

REQUEST_ID_PATTERN: Final = r"^[A-Za-z0-9._:-]{1,128}$"
"""A request id as the API keeps it (the edge's X-Request-Id when well-formed)."""
RequestId = Annotated[str, Field(pattern=REQUEST_ID_PATTERN)]
# PostgreSQL keeps timestamptz from 4713 BC to 294276 AD, past Python's years 1..9999;
# but a stored instant near those ends reads back outside Python's range in a session
# whose time zone shifts it past year 1 or 9999 (psycopg raises DataError on read).
_EARLIEST: Final = datetime(2, 1, 1, tzinfo=UTC)
_LATEST: Final = datetime(9998, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def _readable_instant(value: datetime) -> datetime:
    if not _EARLIEST <= value <= _LATEST:
        raise ValueError("must be between the years 2 and 9998 (UTC)")
    return value


Instant = Annotated[AwareDatetime, AfterValidator(_readable_instant)]
"""A time-zone-aware point in time that every session time zone can read back."""


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
    accepted_at: Instant
    request_id: RequestId | None = None
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
    operator: Annotated[str, Field(min_length=1, max_length=128), StorableText]
    """Who made the change: the operator key's id, for the audit record."""
    accepted_at: Instant
    request_id: RequestId | None = None
    desired: DesiredState


TopicRecord = Annotated[AgentEventRecord | DesiredStateRecord, Field(discriminator="kind")]
TOPIC_RECORD: Final[TypeAdapter[TopicRecord]] = TypeAdapter(TopicRecord)


def decode_topic_record(raw: bytes) -> TopicRecord:
    """Parse one record value from the events topic.

    Raises pydantic.ValidationError for anything that is not a valid record.
    """
    return TOPIC_RECORD.validate_json(raw)

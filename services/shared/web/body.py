"""Reading a JSON request body and validating it into a pydantic model.

Every HTTP service names an invalid field the same way, JSON-path-like from the
body's root: ``events[3].payload.health`` (list items by index in brackets, keys
after dots, ``$`` for the whole body). This is the form of ``errors[].field`` in
every 422 problem (the OpenAPI document says so).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Final, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from services.shared.events import EVENT_TYPES, UNSTORABLE_SURROGATE
from services.shared.jsonbody import refuse_duplicate_keys
from services.shared.problems import (
    FieldError,
    MalformedRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)

# Pydantic puts the tag of a discriminated union into the error location
# (events.3.heartbeat.payload); the agent's JSON has no such level.
_UNION_TAGS: Final = frozenset(EVENT_TYPES)
_MAX_FIELD_CHARS: Final = 200
_SURROGATE: Final = re.compile("[\ud800-\udfff]")

Model = TypeVar("Model", bound=BaseModel)


async def read_json_body(request: web.Request, limit: int) -> bytes:
    """The raw body of a JSON request of at most ``limit`` bytes.

    Raises UnsupportedMediaType (not ``application/json``) or PayloadTooLarge.
    """
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"send the body as application/json, not {request.content_type[:64]}"
        )
    too_large = PayloadTooLarge(f"the body must be at most {limit} bytes; send a smaller one")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise too_large from e


def parse_json_model(body: bytes, model: type[Model], what: str) -> Model:
    """``body`` validated as ``model``.

    Raises MalformedRequest when it is not JSON or an object in it repeats a key,
    ValidationFailed (one error per invalid field) when it is not a valid ``what``.
    """
    refuse_duplicate_keys(body)
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise body_problem(e, what, body, model) from e


def field_path(loc: Sequence[int | str], error_type: str = "") -> str:
    """A pydantic error location as a JSON-path-like name: ``events[3].payload.health``.

    ``$`` names the whole body.
    """
    path = ""
    previous: int | str | None = None
    for item in loc:
        if isinstance(item, str):
            # An unknown key may hold an unpaired surrogate; the answer must stay UTF-8.
            item = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", item)
        if isinstance(item, int):
            path += f"[{item}]"
        elif isinstance(previous, int) and item in _UNION_TAGS:
            pass
        else:
            path += f".{item}" if path else str(item)
        previous = item
    if error_type in ("union_tag_invalid", "union_tag_not_found"):
        # The error is about the discriminator field itself, not the whole event.
        path += ".type" if path else "type"
    if len(path) > _MAX_FIELD_CHARS:
        path = path[:_MAX_FIELD_CHARS] + "..."
    return path or "$"


def validation_errors(error: ValidationError) -> tuple[FieldError, ...]:
    """One FieldError per pydantic error, never echoing the input value."""
    return tuple(
        FieldError(
            field_path(detail["loc"], detail["type"]),
            # pydantic's own words ("unable to parse raw data as a unicode string")
            # do not say what to change.
            UNSTORABLE_SURROGATE if detail["type"] == "string_unicode" else detail["msg"],
        )
        for detail in error.errors(include_url=False, include_input=False)
    )


def unpaired_surrogates(body: bytes, model: type[BaseModel]) -> ValidationError | None:
    """The body's field errors when its only fault as JSON is an unpaired surrogate escape.

    pydantic's JSON parser refuses ``"\\ud800"`` as invalid JSON, which would answer
    400 without naming the field. Python's parser reads it (RFC 8259 allows the
    escape), and validating what it read names every field holding one. None when
    the body is not JSON for Python either, or has no such string.
    """
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    try:
        model.model_validate(parsed)
    except ValidationError as e:
        for detail in e.errors(include_url=False, include_input=False):
            # A string value holding one, or an (unknown) key holding one.
            if detail["type"] == "string_unicode" or any(
                isinstance(item, str) and _SURROGATE.search(item) for item in detail["loc"]
            ):
                return e
    return None


def body_problem(
    error: ValidationError, what: str, body: bytes, model: type[BaseModel]
) -> MalformedRequest | ValidationFailed:
    """MalformedRequest when the body is not JSON at all, else ValidationFailed listing fields."""
    details = error.errors(include_url=False, include_input=False)
    if details and details[0]["type"] == "json_invalid":
        located = unpaired_surrogates(body, model)
        if located is None:
            return MalformedRequest(f"the body is not valid JSON: {details[0]['msg']}")
        error = located
    errors = validation_errors(error)
    return ValidationFailed(
        f"the {what} has {len(errors)} invalid field(s); nothing was accepted", errors=errors
    )

"""JSON request bodies: a repeated object key is refused, whatever parses the body.

RFC 8259 leaves the meaning of a repeated key open: pydantic (jiter), orjson
and msgspec keep the last value silently, other readers keep the first or
fail. A body that means different things to different readers is refused, so
the event the API validated is the one every later reader sees. The check is
its own pass with the standard library's C scanner, independent of the parser
that builds the model, so changing that parser cannot lose it; it builds no
objects (its hook answers None for each one), costing a few microseconds for
a single event and a few milliseconds for a full 1 MiB batch.
"""

from __future__ import annotations

import json
from typing import Any, Final

from services.shared.problems import MalformedRequest

DETAIL: Final = (
    "a JSON object in the body repeats a key; readers disagree on which value counts, "
    "so send each key once"
)
TOO_DEEP: Final = "the body nests JSON too deeply"


class DuplicateKey(MalformedRequest):
    slug = "duplicate-json-key"
    title = "Repeated JSON object key"


class _Repeated(Exception):
    pass


def _no_repeats(pairs: list[tuple[str, Any]]) -> None:
    if len(pairs) > 1 and len({key for key, _ in pairs}) != len(pairs):
        raise _Repeated
    return None


def refuse_duplicate_keys(body: bytes) -> None:
    """Raise DuplicateKey when any object in ``body`` repeats a key (after unescaping).

    A body that is not JSON passes: the parser that builds the model refuses it
    with its own message. Raises MalformedRequest for nesting deeper than the
    interpreter's recursion limit, which no valid body reaches.
    """
    try:
        json.loads(body, object_pairs_hook=_no_repeats)
    except _Repeated:
        raise DuplicateKey(DETAIL) from None
    except RecursionError:
        raise MalformedRequest(TOO_DEEP) from None
    except ValueError:
        return

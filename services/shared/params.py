"""Path and query parameters: validated here, refused with a 422 naming the parameter."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from multidict import MultiMapping

from services.shared.identity import ID_PATTERN, IdentityError, check_id
from services.shared.problems import FieldError, ValidationFailed

_DIGITS: Final = re.compile(r"[0-9]{1,9}")


def path_id(name: str, value: str) -> str:
    """``value`` if it is a valid customer/environment id; else ValidationFailed naming ``name``.

    The value is not echoed, so a hostile path cannot inflate or inject into the answer.
    """
    try:
        return check_id(name, value)
    except IdentityError as e:
        raise ValidationFailed(
            f"the {name} in the path is not a valid id",
            errors=(FieldError(name, f"must match {ID_PATTERN}"),),
        ) from e


def query_int(values: Sequence[str], name: str, *, minimum: int, maximum: int, default: int) -> int:
    """A query parameter given at most once as a decimal integer in [minimum, maximum].

    ``values`` are all of its values (``request.query.getall(name, [])``); absent
    means ``default``. Anything else (repeated, signed, fractional, out of range)
    raises ValidationFailed naming ``name``.
    """
    if not values:
        return default
    if len(values) == 1 and _DIGITS.fullmatch(values[0]):
        number = int(values[0])
        if minimum <= number <= maximum:
            return number
    message = f"must be one integer from {minimum} to {maximum}"
    raise ValidationFailed(f"the {name} parameter {message}", errors=(FieldError(name, message),))


def limit_param(query: MultiMapping[str], *, maximum: int, default: int) -> int:
    """The ``limit`` query parameter of a listing: one integer from 1 to ``maximum``.

    ``query`` is the request's query (a multidict: every value of ``limit`` counts).
    Raises ValidationFailed naming ``limit``.
    """
    return query_int(
        query.getall("limit", []),
        "limit",
        minimum=1,
        maximum=maximum,
        default=default,
    )

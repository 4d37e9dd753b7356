"""What an error while applying a batch means: back-pressure, or poison to isolate.

Every failure of an apply transaction ends in exactly one of two paths:

- back-pressure: the database cannot take the batch now (unreachable, out of
  resources, shutting down, read-only after a failover, a serialization failure,
  a timeout). Nothing is wrong with the records: the batch is retried, nothing is
  dead-lettered, the partition waits.
- poison: something in the batch's records made the database (or our own code
  planning them) refuse it. The batch is split until the record that causes the
  refusal is alone; that record is dead-lettered with the reason and the rest is
  applied.

PostgreSQL says which by the class of its SQLSTATE (the first two characters,
https://www.postgresql.org/docs/15/errcodes-appendix.html): data exceptions (22),
integrity constraint violations (23) and program limits exceeded (54) are about
the values written; every other class is about the server or the session.
"""

from __future__ import annotations

from typing import Literal

import psycopg
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

Failure = Literal["back_pressure", "poison"]

POISON_SQLSTATE_CLASSES: frozenset[str] = frozenset({"22", "23", "54"})
"""data_exception, integrity_constraint_violation, program_limit_exceeded."""


def sqlstate_of(error: BaseException) -> str | None:
    """The SQLSTATE PostgreSQL sent with ``error`` (None when it came from the client side)."""
    original = error.orig if isinstance(error, DBAPIError) else error
    if isinstance(original, psycopg.Error):
        return original.sqlstate
    return None


def classify(error: BaseException) -> Failure:
    """Back-pressure or poison; see the module docstring.

    Errors raised on the client side before anything reached the server count by
    what they say about the values: psycopg refuses a NUL character in text as a
    ``DataError`` without a SQLSTATE, and a string that cannot be encoded raises
    ``UnicodeEncodeError``. Any other exception from planning or writing a batch is
    raised by the records in it (the same code applies every other batch), so it is
    poison too: dead-lettering the record keeps the partition moving, and the
    dead-letter replay brings it back once the cause is fixed.
    """
    if isinstance(error, DBAPIError | psycopg.Error):
        state = sqlstate_of(error)
        if state is not None:
            return "poison" if state[:2] in POISON_SQLSTATE_CLASSES else "back_pressure"
        original = error.orig if isinstance(error, DBAPIError) else error
        if isinstance(original, psycopg.DataError | psycopg.IntegrityError):
            return "poison"
        return "back_pressure"
    if isinstance(error, SQLAlchemyError | OSError):
        # The pool's timeout, a closed connection, a refused or reset socket.
        return "back_pressure"
    return "poison"


def is_back_pressure(error: BaseException) -> bool:
    return classify(error) == "back_pressure"


def describe(error: BaseException) -> str:
    """One line for the dead-letter record: the database's own message, without SQL."""
    original = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    message = str(original).strip().splitlines()[0] if str(original).strip() else ""
    return f"{original.__class__.__name__}: {message}" if message else original.__class__.__name__

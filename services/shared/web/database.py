"""An unreachable database, inside a handler, answered as 503 with ``Retry-After``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from services.shared.problems import ServiceUnavailable

log = logging.getLogger(__name__)

DATABASE_DOWN: Final[tuple[type[Exception], ...]] = (
    OperationalError,
    InterfaceError,
    PoolTimeoutError,
)
"""What SQLAlchemy raises when PostgreSQL cannot be reached or the pool is exhausted."""


@contextmanager
def database_errors(
    what: str,
    *,
    retry_after_s: int,
    detail: str,
    also: tuple[type[Exception], ...] = (),
) -> Iterator[None]:
    """Turn an unreachable database (or one of ``also``) inside the block into ServiceUnavailable.

    ``what`` names the operation in the log line; ``detail`` is the client's answer.
    """
    try:
        yield
    except DATABASE_DOWN + also as e:
        log.warning("%s failed: %s", what, e)
        raise ServiceUnavailable(detail, retry_after_s=retry_after_s) from e

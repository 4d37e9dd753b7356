"""Database engines shared by the services (async) and their command-line tools (sync)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import sqlalchemy
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool, QueuePool

from services.shared.settings import DatabaseSettings


def create_engine(settings: DatabaseSettings, *, application_name: str) -> AsyncEngine:
    """An async engine on psycopg 3. The caller owns it and must ``await engine.dispose()``."""
    return create_async_engine(
        settings.async_url,
        pool_size=settings.database_pool_size,
        max_overflow=0,
        pool_pre_ping=True,
        connect_args={"application_name": application_name, "connect_timeout": 5},
    )


def pool_use(engine: AsyncEngine) -> dict[str, int]:
    """The engine's pool now: connections in use, idle in the pool, and the most it may open.

    Empty for a pool that keeps no count (not the QueuePool ``create_engine`` makes).
    """
    pool = engine.pool
    if not isinstance(pool, QueuePool):
        return {}
    return {
        "in_use": pool.checkedout(),
        "idle": pool.checkedin(),
        # create_engine allows no overflow: the pool's size is the most it opens.
        "max": pool.size(),
    }


@contextmanager
def sync_transaction(libpq_dsn: str) -> Iterator[sqlalchemy.Connection]:
    """One transaction on one new connection, for command-line tools.

    Commits when the block ends without an exception (so whatever the block does
    before it ends, such as a journal append, happens before the commit), rolls
    back otherwise; the connection is closed either way.
    """
    engine = sqlalchemy.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(libpq_dsn), poolclass=NullPool
    )
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()

"""Database engine factory shared by the services."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

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

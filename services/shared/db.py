"""Database engine factory shared by the services."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

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

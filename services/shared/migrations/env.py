"""Alembic environment: runs migrations on the database named by the caller."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from services.shared.schema import metadata

config = context.config
url = config.get_main_option("sqlalchemy.url")
if not url:
    raise RuntimeError("sqlalchemy.url is not set; run migrations through services.shared.migrate")

engine = create_engine(url)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()

"""The migrations and the SQLAlchemy metadata describe the same schema."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from services.shared.schema import metadata
from tests.support.stack import TEMPLATE_DATABASE, Stack


def test_migrated_database_matches_the_metadata(stack: Stack) -> None:
    settings = stack.database.model_copy(update={"database_name": TEMPLATE_DATABASE})
    engine = create_engine(settings.sync_url)
    try:
        with engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    assert differences == []

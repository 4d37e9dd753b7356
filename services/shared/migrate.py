"""Bring the database schema to the newest Alembic revision.

``python -m services.shared.migrate`` upgrades the database named by the
``FLEETPLANE_DATABASE_*`` settings (``DatabaseSettings``); it is idempotent and
safe to run on every start.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

from services.shared.settings import DatabaseSettings

logger = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(sync_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # Percent signs in passwords would be read as interpolation by configparser.
    config.set_main_option("sqlalchemy.url", sync_url.replace("%", "%%"))
    return config


def upgrade(settings: DatabaseSettings) -> None:
    command.upgrade(alembic_config(settings.sync_url), "head")


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(
        prog="python -m services.shared.migrate",
        description="Upgrade the database named by FLEETPLANE_DATABASE_* to the newest schema.",
    ).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    upgrade(DatabaseSettings())
    logger.info("database schema is at the newest revision")


if __name__ == "__main__":
    main()

"""``python -m services.controller``: run one controller of the consumer group."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import faust

from services.controller.app import create_app
from services.controller.settings import ControllerSettings
from services.shared.readiness import DependencyUnavailableError, wait_for_kafka, wait_for_postgres

logger = logging.getLogger("services.controller")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.controller",
        description="Apply agent events from Kafka to PostgreSQL, one fenced owner per partition. "
        "Settings come from FLEETPLANE_* environment variables (see docs).",
    )
    parser.add_argument("--web-port", type=int, help="port for /healthz, /readyz and /metrics")
    parser.add_argument("--instance-id", help="name of this controller in the ownership table")
    parser.add_argument("--loglevel", default="info")
    args = parser.parse_args(argv)

    overrides = {}
    if args.web_port is not None:
        overrides["web_port"] = args.web_port
    if args.instance_id:
        overrides["instance_id"] = args.instance_id
    settings = ControllerSettings(**overrides)

    logging.basicConfig(
        level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        asyncio.run(_wait_for_dependencies(settings))
    except DependencyUnavailableError as e:
        logger.error("cannot start: %s", e)
        return 2

    app = create_app(settings)
    worker = faust.Worker(app, loglevel=args.loglevel, quiet=True)
    # The worker stops the app (leaving the consumer group) on SIGTERM and SIGINT.
    worker.execute_from_commandline()
    return 0


async def _wait_for_dependencies(settings: ControllerSettings) -> None:
    await wait_for_postgres(settings.database.libpq_dsn, settings.startup_timeout_s)
    await wait_for_kafka(
        settings.kafka.kafka_bootstrap,
        settings.startup_timeout_s,
        topics=(settings.kafka.events_topic, settings.kafka.dead_letter_topic),
    )


if __name__ == "__main__":
    sys.exit(main())

"""``python -m services.api [--port N]``: run the API service until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import uvloop

from services.api.app import create_app
from services.api.settings import ApiSettings
from services.shared import readiness
from services.shared.web import run

log = logging.getLogger("services.api")

DESCRIPTION = (
    "Fleetplane API service behind the nginx edge: accepts agent events and operator "
    "desired-state changes and produces them to Kafka, answers agents' command long "
    "polls and operators' reads from PostgreSQL; GET /openapi.json describes it. "
    "Configured by FLEETPLANE_API_* (host, port, tls_cert, tls_key, edge_ca, "
    "edge_client_cn, produce_timeout_s, producer_metadata_max_age_s, producers, retry_after_s, "
    "startup_timeout_s, shutdown_timeout_s, max_body_bytes, liveness_connected_s, "
    "liveness_lost_s, operator_key_cache_s), FLEETPLANE_PKI_DIR, FLEETPLANE_DATABASE_* and "
    "FLEETPLANE_KAFKA_BOOTSTRAP / FLEETPLANE_EVENTS_TOPIC."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return run.parse_args("python -m services.api", DESCRIPTION, argv)


def dependencies(settings: ApiSettings) -> list[readiness.Dependency]:
    """Kafka with the events topic, then PostgreSQL."""
    return [
        readiness.kafka(settings.kafka.kafka_bootstrap, (settings.kafka.events_topic,)),
        readiness.postgres(settings.database.libpq_dsn),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the service; returns the process exit code (0 after a graceful stop)."""
    # uvloop's event loop for the start-up wait and run_app alike: the accept path
    # is mostly socket and TLS work, which it does in C.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return run.run_service(
        parse_args(argv),
        logger=log,
        load=ApiSettings.load,
        create_app=create_app,
        dependencies=dependencies,
        timeout_setting="FLEETPLANE_API_STARTUP_TIMEOUT_S",
        # nginx logs every request already; a line per request here would cost
        # the hot path a log record and a formatted line.
        access_log=False,
    )


if __name__ == "__main__":
    sys.exit(main())

"""``python -m services.api [--port N]``: run the API service until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys

import uvloop
from aiohttp import web
from pydantic import ValidationError

from services.api.app import create_app
from services.api.settings import ApiSettings
from services.api.startup import DependencyTimeout, wait_for_dependencies
from services.api.tls import server_ssl_context
from services.shared.logs import configure_logging

log = logging.getLogger("services.api")


def _port(value: str) -> int:
    port = int(value)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port")
    return port


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.api",
        description=(
            "Fleetplane API service behind the nginx edge: accepts agent events and operator "
            "desired-state changes and produces them to Kafka, answers agents' command long "
            "polls and operators' reads from PostgreSQL; GET /openapi.json describes it. "
            "Configured by FLEETPLANE_API_* (host, port, tls_cert, tls_key, edge_ca, "
            "edge_client_cn, produce_timeout_s, producer_metadata_max_age_s, producers, "
            "retry_after_s, startup_timeout_s, shutdown_timeout_s, max_body_bytes, "
            "liveness_connected_s, liveness_lost_s, operator_key_cache_s), FLEETPLANE_PKI_DIR, "
            "FLEETPLANE_DATABASE_* and FLEETPLANE_KAFKA_BOOTSTRAP / FLEETPLANE_EVENTS_TOPIC."
        ),
    )
    parser.add_argument("--port", type=_port, help="listen on this port (overrides settings)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the service; returns the process exit code (0 after a graceful stop)."""
    args = parse_args(argv)
    configure_logging(args.log_level.upper())
    # uvloop's event loop for asyncio.run and run_app alike: the accept path is
    # mostly socket and TLS work, which it does in C.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        settings = ApiSettings.load()
    except ValidationError as e:
        log.error("invalid settings: %s", e)
        return 2
    if args.port is not None:
        settings = settings.model_copy(update={"port": args.port})
    try:
        ssl_context = server_ssl_context(settings)
    except (OSError, ssl.SSLError) as e:
        log.error(
            "cannot load the TLS files (%s, %s, %s): %s; run the PKI setup or set "
            "FLEETPLANE_PKI_DIR / FLEETPLANE_API_TLS_*",
            settings.tls_cert,
            settings.tls_key,
            settings.edge_ca,
            e,
        )
        return 2
    try:
        asyncio.run(wait_for_dependencies(settings))
    except DependencyTimeout as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 130
    log.info("listening on https://%s:%d", settings.host, settings.port)
    # run_app turns SIGTERM/SIGINT into a graceful stop: close the listener, let
    # in-flight requests finish (up to shutdown_timeout_s), then run cleanup
    # contexts, which flush the Kafka producer.
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ssl_context=ssl_context,
        shutdown_timeout=settings.shutdown_timeout_s,
        handle_signals=True,
        # nginx logs every request already; a line per request here would cost
        # the hot path a log record and a formatted line.
        access_log=None,
        print=None,
    )
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

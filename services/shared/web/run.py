"""The ``python -m services.<name>`` entry block of an HTTP service behind the edge.

Configure logging, read settings (exit 2 when invalid), load the TLS files (exit 2
when unreadable), wait for the dependencies under one deadline (exit 1 at the
deadline), then serve until SIGTERM or SIGINT with a graceful stop (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from aiohttp import web
from aiohttp.log import access_logger as aiohttp_access_logger
from pydantic import ValidationError

from services.shared.logs import configure_logging
from services.shared.readiness import Dependency, DependencyUnavailableError, wait_for
from services.shared.web.settings import HttpServiceSettings
from services.shared.web.tls import server_ssl_context

Settings = TypeVar("Settings", bound=HttpServiceSettings)


def port(value: str) -> int:
    """An argparse type: a TCP port number."""
    number = int(value)
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port")
    return number


def parse_args(prog: str, description: str, argv: list[str] | None) -> argparse.Namespace:
    """``--port`` (overrides settings) and ``--log-level``; exits on ``--help`` or bad values."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--port", type=port, help="listen on this port (overrides settings)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser.parse_args(argv)


def run_service(
    args: argparse.Namespace,
    *,
    logger: logging.Logger,
    load: Callable[[], Settings],
    create_app: Callable[[Settings], web.Application],
    dependencies: Callable[[Settings], Sequence[Dependency]],
    timeout_setting: str,
    other_files: Callable[[Settings], Sequence[Path]] = lambda _: (),
    access_log: bool = True,
) -> int:
    """Run the service; returns the process exit code (0 after a graceful stop).

    ``other_files`` are files the service needs besides its TLS files (checked
    readable before waiting); ``timeout_setting`` names the variable of
    ``startup_timeout_s`` for the message at the deadline. ``access_log=False``
    writes no line per request (for a service whose requests the edge logs).
    """
    configure_logging(args.log_level.upper())
    try:
        settings = load()
    except ValidationError as e:
        logger.error("invalid settings: %s", e)
        return 2
    if args.port is not None:
        settings = settings.model_copy(update={"port": args.port})
    try:
        ssl_context = server_ssl_context(settings.tls_cert, settings.tls_key, settings.edge_ca)
        for path in other_files(settings):
            path.stat()
    except (OSError, ssl.SSLError) as e:
        logger.error(
            "cannot load the TLS or CA files (%s, %s, %s): %s; run the PKI setup or set "
            "FLEETPLANE_PKI_DIR",
            settings.tls_cert,
            settings.tls_key,
            settings.edge_ca,
            e,
        )
        return 2
    try:
        asyncio.run(
            wait_for(dependencies(settings), settings.startup_timeout_s, setting=timeout_setting)
        )
    except DependencyUnavailableError as e:
        logger.error("cannot start: %s", e)
        return 1
    except KeyboardInterrupt:
        return 130
    logger.info("listening on https://%s:%d", settings.host, settings.port)
    # run_app turns SIGTERM/SIGINT into a graceful stop: close the listener, let
    # in-flight requests finish (up to shutdown_timeout_s), then run cleanup
    # contexts, which close producers and database pools.
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ssl_context=ssl_context,
        shutdown_timeout=settings.shutdown_timeout_s,
        handle_signals=True,
        access_log=aiohttp_access_logger if access_log else None,
        print=None,
    )
    logger.info("stopped")
    return 0

"""``python -m services.gateway_auth [--port N]``: run gateway_auth until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import ssl
import sys

from aiohttp import web
from pydantic import ValidationError

from services.gateway_auth.app import create_app
from services.gateway_auth.settings import GatewayAuthSettings
from services.shared.logs import configure_logging

log = logging.getLogger("services.gateway_auth")


def _port(value: str) -> int:
    port = int(value)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port")
    return port


def server_ssl_context(settings: GatewayAuthSettings) -> ssl.SSLContext:
    """TLS server context: asks for a client certificate and verifies it against the
    internal CA; the handlers accept only the edge's (CN=fleetplane-edge).

    Raises OSError / ssl.SSLError when a file is missing or unreadable.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    context.load_verify_locations(cafile=settings.edge_ca)
    # Optional so health checks answer without one; every route that matters
    # checks that the peer is the edge.
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway_auth",
        description=(
            "Fleetplane gateway_auth behind the nginx edge: agent enrollment and renewal, "
            "operator enrollment tokens and revocations, the edge's per-request certificate "
            "check. Configured by FLEETPLANE_GATEWAY_AUTH_* (host, port, tls_cert, tls_key, "
            "edge_ca, edge_client_cn, issuing_ca_cert, issuing_ca_key, agent_validity_s, "
            "token_ttl_s, token_ttl_max_s, trust_reload_s), FLEETPLANE_PKI_DIR and "
            "FLEETPLANE_DATABASE_*."
        ),
    )
    parser.add_argument("--port", type=_port, help="listen on this port (overrides settings)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    configure_logging(args.log_level.upper())
    try:
        settings = GatewayAuthSettings.load()
    except ValidationError as e:
        log.error("invalid settings: %s", e)
        return 2
    if args.port is not None:
        settings = settings.model_copy(update={"port": args.port})
    try:
        ssl_context = server_ssl_context(settings)
        for path in (settings.issuing_ca_cert, settings.issuing_ca_key):
            path.stat()
    except (OSError, ssl.SSLError) as e:
        log.error("cannot load the TLS or CA files: %s; run the PKI setup", e)
        return 2
    log.info("listening on https://%s:%d", settings.host, settings.port)
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ssl_context=ssl_context,
        shutdown_timeout=settings.shutdown_timeout_s,
        handle_signals=True,
        print=None,
    )
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

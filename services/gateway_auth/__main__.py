"""``python -m services.gateway_auth [--port N]``: run gateway_auth until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import sys

from services.gateway_auth.app import create_app
from services.gateway_auth.settings import GatewayAuthSettings
from services.shared import readiness
from services.shared.web import run


def main(argv: list[str] | None = None) -> int:
    """Run the service; returns the process exit code (0 after a graceful stop)."""
    args = run.parse_args(
        "python -m services.gateway_auth",
        "Fleetplane gateway_auth behind the nginx edge: agent enrollment and renewal, "
        "operator enrollment tokens and revocations, the edge's per-request certificate "
        "check. Configured by FLEETPLANE_GATEWAY_AUTH_* (host, port, tls_cert, tls_key, "
        "edge_ca, edge_client_cn, issuing_ca_cert, issuing_ca_key, agent_validity_s, "
        "token_ttl_s, token_ttl_max_s, trust_reload_s, startup_timeout_s), "
        "FLEETPLANE_PKI_DIR, FLEETPLANE_DATABASE_* and FLEETPLANE_KAFKA_BOOTSTRAP.",
        argv,
    )
    # PostgreSQL holds the identity tables; Kafka the identity journal.
    return run.run_service(
        args,
        logger=logging.getLogger("services.gateway_auth"),
        load=GatewayAuthSettings.load,
        create_app=create_app,
        dependencies=lambda settings: [
            readiness.postgres(settings.database.libpq_dsn),
            readiness.kafka(settings.kafka.kafka_bootstrap),
        ],
        timeout_setting="FLEETPLANE_GATEWAY_AUTH_STARTUP_TIMEOUT_S",
        other_files=lambda settings: (settings.issuing_ca_cert, settings.issuing_ca_key),
        # Every agent request the edge proxies costs a check here (a cached
        # answer lasts 1 s), and nginx logs that request already: a line per
        # check would cost the check path a log record and a formatted line.
        access_log=False,
    )


if __name__ == "__main__":
    sys.exit(main())

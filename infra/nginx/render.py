#!/usr/bin/env python3
"""The one renderer of the edge's nginx configuration (infra/nginx/edge.conf.template).

Used by the native stack (infra/local/nginx.sh runs this file), docker compose
(infra/compose/render_edge.py), the benchmarks' and tests' extra edges
(``EdgeProbe``) and the tests that read what the running edge enforces. Every
difference between those edges is a value here, never an edit of rendered text:
ports, paths, upstream servers, limits, whether the listeners bind the loopback
address only, and the two switches an extra edge may flip (the agent WAF, the
agent listener's client-certificate check).

The template's placeholders are ``@@NAME@@``. Filling is strict both ways: a
placeholder without a value, or a value the template does not ask for, is an
error, so template and renderer cannot drift apart silently.

Standard library only: nginx.sh runs it with the system's python3 before any
virtual environment exists.

    python3 infra/nginx/render.py --output <file> --edge-port 18443 ...  (see --help)
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
EDGE_TEMPLATE: Final = REPO_ROOT / "infra" / "nginx" / "edge.conf.template"
NOOP_TEMPLATE: Final = REPO_ROOT / "infra" / "nginx" / "noop-upstream.conf.template"

_PLACEHOLDER: Final = re.compile(r"@@([A-Z_]+)@@")


class RenderError(ValueError):
    """The template and the values do not match."""


def fill(template: str, values: Mapping[str, str]) -> str:
    """Replace every ``@@NAME@@`` with ``values[NAME]``; RenderError on any mismatch."""
    used = set(_PLACEHOLDER.findall(template))
    if missing := used - values.keys():
        raise RenderError(f"template placeholders without a value: {sorted(missing)}")
    if unused := values.keys() - used:
        raise RenderError(f"values the template does not use: {sorted(unused)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class EdgeLimits:
    """The edge's limits; the defaults are the native stack's (infra/local/lib.sh).

    Per agent identity (certificate subject): sustained requests/s, the burst
    above it, requests in flight (a long poll counts while it waits). Operators
    and enrollment: the same per client address. ``edge_conn`` bounds requests
    in flight on the whole edge. ``api_conns`` bounds the requests in flight to
    each API instance on every route but the long poll: beyond it, 503 with
    Retry-After at once instead of a queue.
    """

    agent_rate: int = 10
    agent_burst: int = 40
    agent_conn: int = 8
    operator_rate: int = 20
    operator_burst: int = 40
    operator_conn: int = 16
    edge_conn: int = 3000
    api_conns: int = 1024

    @classmethod
    def unlimited(cls) -> EdgeLimits:
        """Limits an extra edge that measures or probes the WAF never reaches."""
        return cls(
            agent_rate=1_000_000,
            agent_burst=1_000_000,
            agent_conn=60_000,
            operator_rate=1_000_000,
            operator_burst=1_000_000,
            operator_conn=60_000,
            edge_conn=60_000,
            api_conns=60_000,
        )


@dataclass(frozen=True)
class EdgeConfig:
    """Everything that differs between two rendered edges."""

    nginx_dir: str
    """The edge's run folder: logs/ and temp/ live here (the caller creates them)."""
    pki_dir: str
    edge_port: int
    operator_port: int
    enroll_port: int
    status_port: int
    api_servers: Sequence[str]
    """``host:port`` of each API instance."""
    gateway_auth: str
    """``host:port`` of gateway_auth (enrollment, renewal, identity administration)."""
    nginx_modules: str = "/usr/lib/nginx/modules"
    workers: str = "1"
    pid_file: str = ""
    """Default: ``<nginx_dir>/nginx.pid``."""
    repo_root: str = str(REPO_ROOT)
    """Where the template finds infra/nginx/{modsecurity,waf.d,problems.conf}."""
    crs_setup: str = "/etc/modsecurity/crs/crs-setup.conf"
    crs_rules: str = "/usr/share/modsecurity-crs/rules"
    limits: EdgeLimits = field(default_factory=EdgeLimits)
    loopback_only: bool = True
    """Listen on 127.0.0.1 only (the native stack); False in a container, whose
    published ports arrive on the container's own address."""
    agent_waf: bool = True
    agent_mtls: bool = True
    """False only for an extra edge probed by tools without a client certificate."""

    def with_limits(self, limits: EdgeLimits) -> EdgeConfig:
        return replace(self, limits=limits)


# The upstream server lines. Accept routes: an instance that failed 3 times in
# a row sits out 2 s, and at most api_conns requests are in flight to it. The
# long poll's group has no max_conns: each open poll holds a connection, and the
# per-agent and whole-edge limits already bound them.
_ACCEPT_SERVER: Final = "        server {address} max_fails=3 fail_timeout=2s max_conns={conns};"
_POLL_SERVER: Final = "        server {address} max_fails=3 fail_timeout=2s;"


def edge_values(config: EdgeConfig) -> dict[str, str]:
    """The template's values for ``config``."""
    if not config.api_servers:
        raise RenderError("the edge needs at least one API server")
    limits = config.limits
    return {
        "NGINX_MODULES": config.nginx_modules,
        "NGINX_WORKERS": config.workers,
        "PID_FILE": config.pid_file or f"{config.nginx_dir}/nginx.pid",
        "NGINX_DIR": config.nginx_dir,
        "PKI_DIR": config.pki_dir,
        "REPO_ROOT": config.repo_root,
        "BIND": "127.0.0.1:" if config.loopback_only else "",
        "EDGE_PORT": str(config.edge_port),
        "OPERATOR_PORT": str(config.operator_port),
        "ENROLL_PORT": str(config.enroll_port),
        "STATUS_PORT": str(config.status_port),
        "API_SERVERS": "\n".join(
            _ACCEPT_SERVER.format(address=a, conns=limits.api_conns) for a in config.api_servers
        ),
        "API_POLL_SERVERS": "\n".join(_POLL_SERVER.format(address=a) for a in config.api_servers),
        "GATEWAY_AUTH_SERVER": config.gateway_auth,
        "AGENT_RATE": str(limits.agent_rate),
        "AGENT_BURST": str(limits.agent_burst),
        "AGENT_CONN": str(limits.agent_conn),
        "OPERATOR_RATE": str(limits.operator_rate),
        "OPERATOR_BURST": str(limits.operator_burst),
        "OPERATOR_CONN": str(limits.operator_conn),
        "EDGE_CONN": str(limits.edge_conn),
        "AGENT_WAF": "on" if config.agent_waf else "off",
        "AGENT_VERIFY_CLIENT": "on" if config.agent_mtls else "off",
        "CRS_SETUP": config.crs_setup,
        "CRS_RULES": config.crs_rules,
    }


def render_edge(config: EdgeConfig, template: str | None = None) -> str:
    """The edge's nginx.conf for ``config`` (from edge.conf.template unless given)."""
    text = EDGE_TEMPLATE.read_text() if template is None else template
    return fill(text, edge_values(config))


def render_noop_upstream(nginx_dir: str, pki_dir: str, port: int) -> str:
    """The no-op upstream's nginx.conf (noop-upstream.conf.template): 202 to anything."""
    return fill(
        NOOP_TEMPLATE.read_text(), {"NGINX_DIR": nginx_dir, "PKI_DIR": pki_dir, "PORT": str(port)}
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Render the edge's nginx configuration.")
    parser.add_argument("--output", type=Path, required=True, help="file to write")
    parser.add_argument("--nginx-dir", required=True)
    parser.add_argument("--pki-dir", required=True)
    parser.add_argument("--pid-file", default="")
    parser.add_argument("--nginx-modules", default=EdgeConfig.nginx_modules)
    parser.add_argument("--workers", default=EdgeConfig.workers)
    parser.add_argument("--edge-port", type=int, required=True)
    parser.add_argument("--operator-port", type=int, required=True)
    parser.add_argument("--enroll-port", type=int, required=True)
    parser.add_argument("--status-port", type=int, required=True)
    parser.add_argument(
        "--api-server", action="append", required=True, help="host:port, once per instance"
    )
    parser.add_argument("--gateway-auth", required=True, help="host:port")
    parser.add_argument("--crs-setup", default=EdgeConfig.crs_setup)
    parser.add_argument("--crs-rules", default=EdgeConfig.crs_rules)
    for limit in fields(EdgeLimits):
        parser.add_argument(
            "--" + limit.name.replace("_", "-"), type=int, default=limit.default, metavar="N"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    limits = EdgeLimits(**{limit.name: getattr(args, limit.name) for limit in fields(EdgeLimits)})
    config = EdgeConfig(
        nginx_dir=args.nginx_dir,
        pki_dir=args.pki_dir,
        pid_file=args.pid_file,
        nginx_modules=args.nginx_modules,
        workers=args.workers,
        edge_port=args.edge_port,
        operator_port=args.operator_port,
        enroll_port=args.enroll_port,
        status_port=args.status_port,
        api_servers=args.api_server,
        gateway_auth=args.gateway_auth,
        crs_setup=args.crs_setup,
        crs_rules=args.crs_rules,
        limits=limits,
    )
    try:
        text = render_edge(config)
    except RenderError as e:
        print(f"render: {e}", file=sys.stderr)
        return 1
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

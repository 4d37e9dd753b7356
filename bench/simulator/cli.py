"""Command line: ``python -m bench.simulator [options]``.

Simulates ``--agents`` agents, each with its own mTLS certificate issued in
memory from the development PKI, against the edge: events in, commands out. It
runs until ``--duration`` passes or Ctrl-C / SIGTERM, then prints a final report
(and writes it as JSON with ``--report``) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from bench.simulator.config import SAMPLE_EVERY, SimConfig
from bench.simulator.display import RecentLog
from bench.simulator.runner import print_report, run, write_report
from services.shared.commands import MAX_WAIT_S
from services.shared.events import MAX_RESOURCES_PER_REPORT

RAMP_PER_AGENT_S: Final = 0.01
"""Default start spacing for large fleets: a thousand agents start over 10 s, not
all within 2 s, so their TLS handshakes and first checks do not arrive as one
burst (a real fleet does not boot in one instant either)."""


def default_ramp_s(agents: int) -> float:
    """SimConfig's ramp, or RAMP_PER_AGENT_S per agent when that is longer."""
    return max(SimConfig.ramp_s, agents * RAMP_PER_AGENT_S)


def _number(
    kind: Callable[[str], float], low: float, high: float | None = None, *, open_low: bool = False
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from e
        too_low = value <= low if open_low else value < low
        if too_low or (high is not None and value > high):
            bound = f"> {low}" if open_low else f">= {low}"
            raise argparse.ArgumentTypeError(
                f"{text} must be {bound}" + (f" and <= {high}" if high is not None else "")
            )
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    defaults = SimConfig()
    parser = argparse.ArgumentParser(
        prog="python -m bench.simulator",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--agents", type=_number(int, 1), default=defaults.agents, help="agents to simulate")
    add("--customers", type=_number(int, 1), default=defaults.customers, help="customers cust-<i>")
    add(
        "--environments-per-customer",
        type=_number(int, 1),
        default=defaults.environments_per_customer,
        help="environments env-<j> per customer",
    )
    add("--edge-url", default=defaults.edge_url, help="the nginx edge")
    add(
        "--pki-dir",
        type=Path,
        default=defaults.pki_dir,
        help="development PKI: root-ca.pem to verify the edge, issuing-ca to make agent certs",
    )
    add(
        "--duration",
        type=_number(float, 0, open_low=True),
        default=None,
        help="seconds to run; without it, until Ctrl-C or SIGTERM",
    )
    add(
        "--heartbeat-s",
        type=_number(float, 0, open_low=True),
        default=defaults.heartbeat_s,
        help="heartbeat interval per agent (jittered +-20%%)",
    )
    add(
        "--poll-wait-s",
        type=_number(int, 0, MAX_WAIT_S),
        default=defaults.poll_wait_s,
        help="long-poll wait for GET /v1/commands (whole seconds)",
    )
    add(
        "--resources",
        type=_number(int, 0, MAX_RESOURCES_PER_REPORT),
        default=defaults.resources,
        help="simulated resources per agent",
    )
    add(
        "--fail-ratio",
        type=_number(float, 0, 1),
        default=defaults.fail_ratio,
        help="share of commands reported as failed",
    )
    add(
        "--ramp-s",
        type=_number(float, 0),
        default=None,
        help="spread agent starts over this many seconds "
        f"(default: {defaults.ramp_s:g}, or {RAMP_PER_AGENT_S * 1000:g} ms per agent if longer)",
    )
    add(
        "--controller-metrics",
        action="append",
        default=[],
        metavar="URL",
        help="a controller's /metrics URL (repeatable); applied/s then comes from "
        f"fleetplane_controller_events_applied_total instead of the 1-in-{SAMPLE_EVERY} samples",
    )
    add(
        "--controller-status",
        action="append",
        default=[],
        metavar="URL",
        help="a controller's /status URL (repeatable; the first that answers is used): "
        "shows which controller owns which partition, with lag and events/s",
    )
    add(
        "--cert-lifetime-s",
        type=_number(float, 60),
        default=defaults.cert_lifetime_s,
        help="lifetime of the agents' first certificates; each renews at about 2/3 of it "
        "(POST /v1/renew) and presents the new one from then on",
    )
    add("--report", type=Path, help="write the final report as JSON here")
    add("--no-live", action="store_true", help="plain progress lines instead of the live screen")
    add("--seed", type=int, help="seed for jitter, delays and failures (ids stay unique)")
    return parser


def config_from_args(args: argparse.Namespace, *, tty: bool) -> SimConfig:
    return SimConfig(
        agents=int(args.agents),
        customers=int(args.customers),
        environments_per_customer=int(args.environments_per_customer),
        edge_url=args.edge_url,
        pki_dir=args.pki_dir,
        duration_s=args.duration,
        heartbeat_s=args.heartbeat_s,
        poll_wait_s=int(args.poll_wait_s),
        resources=int(args.resources),
        fail_ratio=args.fail_ratio,
        ramp_s=args.ramp_s if args.ramp_s is not None else default_ramp_s(int(args.agents)),
        report=args.report,
        # A live screen only makes sense on a terminal; piped output gets lines.
        live=tty and not args.no_live,
        seed=args.seed,
        controller_metrics=tuple(args.controller_metrics),
        controller_status=tuple(args.controller_status),
        cert_lifetime_s=float(args.cert_lifetime_s),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args, tty=sys.stdout.isatty())
    for needed in ("root-ca.pem", "issuing-ca.pem", "issuing-ca.key"):
        if not (config.pki_dir / needed).is_file():
            print(
                f"simulator: {config.pki_dir / needed} is missing; "
                "run `python -m services.gateway_auth.pki init --dir .run/pki`",
                file=sys.stderr,
            )
            return 1
    recent = RecentLog() if config.live else None
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        handlers=[recent] if recent is not None else None,
    )
    report = asyncio.run(run(config, recent=recent))
    print_report(report, sys.stdout)
    if config.report is not None:
        write_report(report, config.report)
        print(f"report written to {config.report}")
    return 0

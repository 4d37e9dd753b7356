"""Start the agents, show progress, stop on duration or signal, build the report."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, NamedTuple, TextIO

from cryptography import x509

from bench.simulator.agent import SimAgent
from bench.simulator.config import SimConfig
from bench.simulator.display import CLEAR, RecentLog, ownership_lines, progress_line, render
from bench.simulator.ownership import partitions_by_owner, status_loop
from bench.simulator.renewal import Renewer
from bench.simulator.scrape import scrape_loop
from bench.simulator.stats import Stats
from bench.simulator.transport import HttpTransport, agent_ssl_context
from services.gateway_auth.pki import AGENT_VALIDITY, load_issuing_ca
from services.shared.identity import AgentIdentity

log = logging.getLogger(__name__)

TITLE: Final = "fleetplane agent simulator"
LIVE_EVERY_S: Final = 1.0
PROGRESS_EVERY_S: Final = 5.0
ISSUE_CHUNK: Final = 250
DRAIN_S: Final = 30.0
"""At the end, how long agents may take to send what they queued (retries with
backoff included) before their batches in flight are abandoned."""


class AgentTls(NamedTuple):
    context: ssl.SSLContext
    certificate: x509.Certificate


def prepare_ssl_contexts(
    pki_dir: Path,
    identities: Sequence[AgentIdentity],
    lifetime: timedelta = AGENT_VALIDITY,
) -> list[AgentTls]:
    """One client context per identity, each with a freshly issued certificate.

    The certificates never outlive the call: ssl can only load a key from a file,
    so each is written to a private temporary folder, loaded, and the folder is
    removed before returning.
    """
    root_ca = pki_dir / "root-ca.pem"
    ca = load_issuing_ca(pki_dir)
    contexts = []
    with tempfile.TemporaryDirectory(prefix="fleetplane-sim-") as folder:
        cert, key = Path(folder) / "agent.pem", Path(folder) / "agent.key"
        key.touch(mode=0o600)
        for identity in identities:
            # Not backdated, so the renewal at 2/3 of the lifetime falls where a
            # short --cert-lifetime-s says.
            issued = ca.issue_agent(
                identity.customer_id,
                identity.environment_id,
                identity.agent_id,
                valid_for=lifetime,
                not_before=datetime.now(UTC),
            )
            key.write_bytes(issued.private_key_pem)
            cert.write_bytes(issued.certificate_pem)
            contexts.append(
                AgentTls(
                    agent_ssl_context(root_ca, cert, key),
                    x509.load_pem_x509_certificate(issued.certificate_pem),
                )
            )
    return contexts


async def issue_all(config: SimConfig, stop: asyncio.Event, out: TextIO) -> list[AgentTls]:
    """Contexts for every agent, made off the loop in chunks; stops early on a signal.

    Each context costs a few milliseconds (mostly OpenSSL), so ten thousand agents
    take tens of seconds: chunks keep Ctrl-C responsive meanwhile.
    """
    identities = list(config.identities())
    contexts: list[AgentTls] = []
    started = time.perf_counter()
    out.write(f"issuing {len(identities)} agent certificates...\n")
    out.flush()
    for first in range(0, len(identities), ISSUE_CHUNK):
        if stop.is_set():
            break
        chunk = identities[first : first + ISSUE_CHUNK]
        contexts += await asyncio.to_thread(
            prepare_ssl_contexts, config.pki_dir, chunk, timedelta(seconds=config.cert_lifetime_s)
        )
    out.write(f"  {len(contexts)} issued in {time.perf_counter() - started:.1f}s\n")
    out.flush()
    return contexts


async def _after(delay_s: float, work: Coroutine[Any, Any, None]) -> None:
    try:
        await asyncio.sleep(delay_s)
    except asyncio.CancelledError:
        work.close()  # never started: close it so Python does not warn
        raise
    await work


async def _show(
    stats: Stats,
    clock: Callable[[], float],
    out: TextIO,
    live: bool,
    recent: RecentLog | None,
) -> None:
    shown_owners: dict[str, list[int]] | None = None
    while True:
        await asyncio.sleep(LIVE_EVERY_S if live else PROGRESS_EVERY_S)
        snapshot = stats.snapshot(clock(), recent=True)
        if live:
            lines = render(snapshot, TITLE)
            if recent is not None and recent.lines:
                lines += ["", "recent problems:", *recent.lines]
            out.write(CLEAR + "\n".join(lines) + "\n\n(Ctrl-C to stop)\n")
        else:
            out.write(progress_line(snapshot) + "\n")
            # Plain output shows the ownership again whenever it changed hands.
            ownership = snapshot["ownership"]
            owners = None if ownership is None else partitions_by_owner(ownership)
            if owners is not None and owners != shown_owners:
                out.write("\n".join(ownership_lines(ownership)[1:]) + "\n")
                shown_owners = owners
        out.flush()


async def run(
    config: SimConfig,
    *,
    out: TextIO = sys.stdout,
    recent: RecentLog | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Run until ``config.duration_s`` passes or SIGINT/SIGTERM; return the report."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    stopped_by = "signal"
    try:
        contexts = await issue_all(config, stop, out)
        master = random.Random(config.seed)
        stats = Stats(clock(), random.Random(master.getrandbits(64)))
        transports = [HttpTransport(config.edge_url, tls.context) for tls in contexts]
        agents = [
            SimAgent(identity, config, transport, stats, random.Random(master.getrandbits(64)))
            # A signal during issuance leaves fewer contexts than identities: zip stops there.
            for identity, transport in zip(config.identities(), transports, strict=False)
        ]
        scrape_transport = (
            HttpTransport("", None)
            if config.controller_metrics or config.controller_status
            else None
        )
        agent_tasks = [
            # Spread the starts so N agents do not all handshake in the same instant.
            asyncio.create_task(_after(config.ramp_s * n / max(len(agents), 1), agent.run()))
            for n, agent in enumerate(agents)
        ]
        tasks: list[asyncio.Task[None]] = list(agent_tasks)
        renewers = [
            Renewer(
                agent.identity,
                tls.certificate,
                transport,
                transport.use_context,
                config.pki_dir / "root-ca.pem",
                random.Random(master.getrandbits(64)),
            )
            for agent, tls, transport in zip(agents, contexts, transports, strict=False)
        ]
        tasks += [asyncio.create_task(renewer.run()) for renewer in renewers]
        if scrape_transport is not None and config.controller_metrics:
            tasks.append(
                asyncio.create_task(
                    scrape_loop(config.controller_metrics, scrape_transport, stats, clock=clock)
                )
            )
        if scrape_transport is not None and config.controller_status:
            tasks.append(
                asyncio.create_task(status_loop(config.controller_status, scrape_transport, stats))
            )
        tasks.append(asyncio.create_task(_show(stats, clock, out, config.live, recent)))
        try:
            if not stop.is_set():
                await asyncio.wait_for(stop.wait(), config.duration_s)
        except TimeoutError:
            stopped_by = "duration"
        finally:
            await _drain(agents, agent_tasks, out)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            closing = [t.close() for t in transports]
            if scrape_transport is not None:
                closing.append(scrape_transport.close())
            await asyncio.gather(*closing, return_exceptions=True)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    report = stats.snapshot(clock(), recent=False)
    renewed = sum(renewer.renewals for renewer in renewers)
    return {
        "stopped_by": stopped_by,
        "config": _config_dict(config),
        "certificate_renewals": renewed,
        **report,
    }


async def _drain(
    agents: Sequence[SimAgent], agent_tasks: Sequence[asyncio.Task[None]], out: TextIO
) -> None:
    """Let every running agent send what it queued, for at most DRAIN_S.

    Agents still waiting to start are cancelled by the caller; so is any agent
    that has not finished by then (its batch in flight counts as abandoned).
    """
    for agent in agents:
        agent.stop()
    pending = [task for task in agent_tasks if not task.done()]
    if not pending:
        return
    out.write(f"\nstopping: {len(pending)} agents send what they queued (at most {DRAIN_S:.0f}s)\n")
    out.flush()
    await asyncio.wait(pending, timeout=DRAIN_S)


def _config_dict(config: SimConfig) -> dict[str, Any]:
    fields = dict(vars(config))
    for name, value in fields.items():
        if isinstance(value, Path):
            fields[name] = str(value)
        elif isinstance(value, tuple):
            fields[name] = list(value)
    return fields


def print_report(report: dict[str, Any], out: TextIO) -> None:
    out.write("\n".join(["", *render(report, f"{TITLE}: final report"), ""]) + "\n")


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")

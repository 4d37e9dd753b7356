"""The whole simulator over real mTLS against a tiny in-process edge on a free port."""

from __future__ import annotations

import io
import json
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bench.simulator.config import SimConfig
from bench.simulator.runner import prepare_ssl_contexts, run, write_report
from services.gateway_auth.pki import AGENT_CA_BUNDLE, EDGE_SERVER, EDGE_SERVER_CHAIN, init_pki
from services.shared.events import EventBatch
from services.shared.identity import AgentIdentity

from .fakes import command


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    init_pki(folder)
    return folder


@dataclass
class Edge:
    """Requires a client certificate from our issuing CA, like nginx; records who called."""

    url: str
    callers: Counter[str] = field(default_factory=Counter)
    events: list[dict[str, Any]] = field(default_factory=list)


def _caller(request: web.Request) -> str:
    transport = request.transport
    assert transport is not None
    peer = transport.get_extra_info("peercert")
    subject = dict(item[0] for item in peer["subject"])
    return f"{subject['organizationName']}/{subject['commonName']}"


@pytest.fixture
async def edge(pki: Path) -> AsyncIterator[Edge]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki / AGENT_CA_BUNDLE)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(pki / EDGE_SERVER_CHAIN, pki / f"{EDGE_SERVER}.key")
    state = Edge("")
    offered: set[str] = set()

    async def post_events(request: web.Request) -> web.Response:
        state.callers[_caller(request)] += 1
        batch = EventBatch.model_validate_json(await request.read())
        state.events += [event.model_dump() for event in batch.events]
        return web.json_response({"accepted": [e.id for e in batch.events]}, status=202)

    async def get_commands(request: web.Request) -> web.Response:
        caller = _caller(request)
        commands = [] if caller in offered else [command(1, epoch=1).model_dump()]
        offered.add(caller)
        return web.json_response({"commands": commands, "next_poll_s": 0.1})

    async def get_event(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["event_id"], "status": "applied"})

    app = web.Application()
    app.router.add_post("/v1/events", post_events)
    app.router.add_get("/v1/commands", get_commands)
    app.router.add_get("/v1/events/{event_id}", get_event)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"https://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


def test_every_agent_gets_its_own_certificate(pki: Path) -> None:
    identities = [AgentIdentity("cust-0", "env-0", f"agent-{n}") for n in range(3)]
    contexts = prepare_ssl_contexts(pki, identities)
    assert len(contexts) == 3
    assert len({id(c) for c in contexts}) == 3


async def test_run_stops_after_duration_and_reports(pki: Path, edge: Edge, tmp_path: Path) -> None:
    config = SimConfig(
        agents=3,
        customers=2,
        environments_per_customer=1,
        edge_url=edge.url,
        pki_dir=pki,
        duration_s=1.5,
        heartbeat_s=0.3,
        poll_wait_s=1,
        ramp_s=0,
        live=False,
        seed=7,
    )
    out = io.StringIO()

    report = await run(config, out=out)

    assert report["stopped_by"] == "duration"
    assert set(edge.callers) == {"cust-0/agent-0", "cust-1/agent-1", "cust-0/agent-2"}
    assert report["errors"] == {}
    assert report["commands"]["applied"] == 3
    assert report["commands"]["newest_epoch"] == 1
    results = [e for e in edge.events if e["type"] == "command_result"]
    assert len(results) == 3
    # 3 boot batches of 2 events, then heartbeats and 3 x (result + state). At the
    # stop, agents send what they queued: nothing in flight is abandoned.
    accepted = report["events"]["accepted"]
    assert 6 + 6 <= accepted == len(edge.events)
    assert report["events"]["abandoned_batches"] == 0
    assert report["events"]["post_latency_ms"]["p50"] is not None
    assert report["agents_running"] == 0
    write_report(report, tmp_path / "r" / "report.json")
    assert json.loads((tmp_path / "r" / "report.json").read_text())["config"]["agents"] == 3

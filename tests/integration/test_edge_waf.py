"""The edge's WAF through the real nginx: hostile input is refused, legitimate data passes.

The agent listener runs the targeted policy (infra/nginx/modsecurity/agent.conf):
a positive model of the request line and checks of the headers, with the API's
strict schema as the body-level defence. The operator listener runs the full
OWASP CRS. docs/threat-model.md ("Edge and WAF policy") gives the reasoning.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from yarl import URL

from bench.simulator.events import EventFactory, Resource
from services.api.openapi import OPERATIONS
from services.shared.commands import MAX_WAIT_S
from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.operators import OperatorClient
from tests.support.waiting import eventually

AgentFactory = Callable[[str, str, str], AgentClient]

# --- helpers ------------------------------------------------------------------------


async def topic_end_offset(deployment: Deployment) -> int:
    """How many records the deployment's events topic holds, all partitions together."""
    consumer = AIOKafkaConsumer(bootstrap_servers=deployment.fleet.stack.kafka_bootstrap)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(deployment.fleet.events_topic, p)
            for p in range(deployment.fleet.partitions)
        ]
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


def audit_ids(deployment: Deployment) -> set[str]:
    """Transaction ids (nginx request ids) of the ModSecurity audit log's lines."""
    path = deployment.fleet.stack.run_dir / "nginx" / "logs" / "modsec_audit.log"
    ids = set()
    for line in path.read_text().splitlines():
        ids.add(json.loads(line)["transaction"]["unique_id"])
    return ids


async def missing_from_audit_log(deployment: Deployment, request_ids: dict[str, str]) -> set[str]:
    """The cases whose request id has no audit line (nginx writes it after answering)."""

    async def missing() -> set[str]:
        logged = audit_ids(deployment)
        return {case for case, rid in request_ids.items() if rid not in logged}

    return await eventually(missing, lambda m: not m, timeout_s=5, interval_s=0.1, what="audit")


async def raw_get(
    agent: AgentClient, target: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """GET a request target sent exactly as written (no normalisation, no re-quoting)."""
    assert agent.session is not None
    url = URL(agent.edge_url + target, encoded=True)
    async with agent.session.get(url, headers=headers) as reply:
        return reply.status, await reply.json(content_type=None)


async def raw_exchange(context: ssl.SSLContext, edge_url: str, request: bytes) -> bytes:
    """Send raw bytes over TLS and return what the edge answers before closing."""
    host, port = URL(edge_url).host, URL(edge_url).port
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), timeout=15)
    finally:
        writer.close()


# --- hostile input on the agent listener ------------------------------------------------

QUERY_ATTACKS = {
    "sqli": "/v1/commands?wait=1%27%20OR%20%271%27=%271",
    "sqli-union": "/v1/commands?id=1%20UNION%20SELECT%20secret_sha256%20FROM%20operator_keys--",
    "xss": "/v1/commands?q=%3Cscript%3Ealert(document.cookie)%3C/script%3E",
    "traversal": "/v1/commands?file=../../../../etc/passwd",
    "response-splitting": "/v1/commands?wait=1%0d%0aSet-Cookie:%20session=attacker",
    "parameter-pollution": "/v1/commands?wait=1&wait=25",
}

PATH_ATTACKS = {
    "traversal": "/v1/events/../../metrics",
    "encoded-traversal": "/v1/events/..%2f..%2fmetrics",
    "double-encoded-traversal": "/v1/events/%252e%252e%252fmetrics",
    "sqli": "/v1/events/1%27%20OR%20%271%27=%271",
    "xss": "/v1/events/%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    "backslash": "/v1/events/..%5c..%5cmetrics",
}

HEADER_ATTACKS = {
    "sqli-user-agent": {"User-Agent": "' OR '1'='1' --"},
    "sqli-custom": {"X-Debug": "1 UNION SELECT secret_sha256 FROM operator_keys"},
    "xss-referer": {"Referer": "<script>alert(document.cookie)</script>"},
    "xss-encoded": {"X-Note": "%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E"},
    "traversal": {"X-Config": "../../../etc/passwd"},
    "encoded-traversal": {"X-Config": "..%252f..%252fetc%252fpasswd"},
    "encoded-crlf": {"X-Note": "a%0d%0aX-Fleetplane-Client-DN:%20CN=agent-9,OU=prod,O=victim"},
    "shellshock": {"User-Agent": "() { :; }; /bin/cat /etc/passwd"},
    "bad-traceparent": {"traceparent": "00-' OR 1=1--"},
}

# Sent as raw bytes, since HTTP clients refuse to write them. Most are refused by
# nginx itself before any rule runs (400); the escape sequence, which nginx lets
# through in a header value, by the WAF (403).
RAW_ATTACKS = {
    "smuggling-cl-te": (
        b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "space-in-header-name": (b"GET /v1/commands HTTP/1.1\r\nHost: x\r\nX Bad: 1\r\n\r\n", 400),
    "nul-in-header": (b"GET /v1/commands HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    "header-folding": (b"GET /v1/commands HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    "null-byte-in-path": (b"GET /v1/events/abc%00.json HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "bad-percent-encoding": (b"GET /v1/events/abc%zz HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "escape-in-header": (b"GET /v1/commands HTTP/1.1\r\nHost: x\r\nX-A: ok\x1b[2J\r\n\r\n", 403),
}


def _body_attacks(agent: AgentClient) -> dict[str, dict[str, Any]]:
    """Events whose structured fields carry an attack (free-text fields are data)."""
    hb = agent.heartbeat()
    obs = agent.observed([{"name": "db", "kind": "statefulset", "version": "15.4"}])

    def resource(**change: str) -> dict[str, Any]:
        return {**obs, "payload": {"resources": [{**obs["payload"]["resources"][0], **change}]}}

    return {
        "sqli-id": {**hb, "id": "ev-1' OR '1'='1"},
        "sqli-type": {**hb, "type": "heartbeat'; DROP TABLE event_records;--"},
        "sqli-boot-id": {**hb, "boot_id": "b1 UNION SELECT secret_sha256 FROM operator_keys"},
        "sqli-version": {**hb, "payload": {**hb["payload"], "agent_version": "1.0' OR 1=1--"}},
        "sqli-resource-name": resource(name="db'; DELETE FROM commands;--"),
        "xss-resource-name": resource(name="<script>alert(1)</script>"),
        "xss-resource-kind": resource(kind="<img src=x onerror=alert(1)>"),
        "traversal-resource-name": resource(name="../../etc/passwd"),
        "traversal-version": resource(version="../../../etc/passwd"),
        "crlf-id": {**hb, "id": "ev-1\r\nX-Injected: 1"},
        "nul-boot-id": {**hb, "boot_id": "boot\u0000-1"},
        "smuggled-identity": {**hb, "customer_id": "victim"},
        "command-in-health": {**hb, "payload": {**hb["payload"], "health": "ok; rm -rf /"}},
    }


async def test_hostile_input_is_refused_and_nothing_reaches_kafka(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    agent = agents("acme", "prod", "agent-1")
    before = await topic_end_offset(deployment)

    refused_by_waf: dict[str, str] = {}  # case -> request id from the problem body
    outcomes: dict[str, int] = {}
    for name, target in {
        **{f"query/{k}": v for k, v in QUERY_ATTACKS.items()},
        **{f"path/{k}": v for k, v in PATH_ATTACKS.items()},
    }.items():
        status, body = await raw_get(agent, target)
        outcomes[name] = status
        if status == 403:
            refused_by_waf[name] = body["request_id"]
    for name, headers in HEADER_ATTACKS.items():
        status, body = await raw_get(agent, "/v1/commands?wait=0", headers)
        outcomes[f"header/{name}"] = status
        if status == 403:
            refused_by_waf[f"header/{name}"] = body["request_id"]
    raw_expected = {}
    for name, (request, expected) in RAW_ATTACKS.items():
        answer = await raw_exchange(agent.ssl_context, agent.edge_url, request)
        outcomes[f"raw/{name}"] = int(answer.split(b" ", 2)[1])
        raw_expected[f"raw/{name}"] = expected
    for name, event in _body_attacks(agent).items():
        status, _ = await agent.post_events([event])
        outcomes[f"body/{name}"] = status

    # Query strings, paths and headers: the WAF (403); raw protocol breakage: as
    # listed; structured body fields: the API's validation (4xx, never 429).
    wrong = {
        name: status
        for name, status in outcomes.items()
        if not (
            (name.split("/")[0] in ("query", "path", "header") and status == 403)
            or (name in raw_expected and status == raw_expected[name])
            or (name.startswith("body/") and 400 <= status < 500 and status not in (403, 429))
        )
    }
    assert wrong == {}, f"not refused as expected: {wrong}"

    # Every WAF refusal has its audit-log line, found by the id in the 403 body.
    assert await missing_from_audit_log(deployment, refused_by_waf) == set()

    # Nothing of it was produced; the same agent's valid event is, so the count is live.
    assert await topic_end_offset(deployment) == before
    assert (await agent.post_events([agent.heartbeat()]))[0] == 202
    assert await topic_end_offset(deployment) == before + 1


async def test_dot_segments_inside_a_resource_name_are_refused(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    agent = agents("acme", "prod", "agent-1")
    event = agent.observed([{"name": "db/../../etc/passwd", "kind": "statefulset", "version": "1"}])
    status, _ = await agent.post_events([event])
    assert 400 <= status < 500


async def test_operator_listener_runs_the_full_crs(deployment: Deployment) -> None:
    """Operator routes: attacks in the path, query and JSON body are refused by the CRS."""
    deployment.start_apis()
    operator = OperatorClient(
        deployment.fleet.stack.pki_dir,
        deployment.operator_key("acme"),
        deployment.fleet.stack.operator_url,
    )
    before = await topic_end_offset(deployment)
    desired = "/v1/operator/customers/acme/environments/prod/desired-state"
    web = {"kind": "deployment", "name": "web", "version": "2.4.1"}
    cases: list[tuple[str, str, Any]] = [
        ("GET", "/v1/operator/customers/acme/environments?id=1%27%20OR%20%271%27=%271", None),
        ("GET", "/v1/operator/customers/acme/audit?q=%3Cscript%3Ealert(1)%3C/script%3E", None),
        ("GET", "/v1/operator/customers/acme/environments?f=../../../../etc/passwd", None),
        ("PUT", desired, {"revision": 1, "resources": [{**web, "name": "x' OR 1=1 --"}]}),
        ("PUT", desired, {"revision": 1, "resources": [{**web, "name": "<script>x</script>"}]}),
        ("PUT", desired, {"revision": 1, "resources": [{**web, "version": "; cat /etc/passwd"}]}),
    ]
    refused = {}
    for method, path, body in cases:
        status, reply = await operator.request(method, path, body)
        assert status == 403, (method, path, status, reply)
        refused[f"{method} {path} {body}"] = reply["request_id"]
    assert await missing_from_audit_log(deployment, refused) == set()
    assert await topic_end_offset(deployment) == before
    # The same route with a clean body passes the CRS and is accepted.
    status, reply = await operator.set_desired("acme", "prod", 1, [web])
    assert status == 202, reply
    assert await topic_end_offset(deployment) == before + 1


# --- legitimate data that looks hostile ------------------------------------------------

LOOKALIKES = [
    "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'",
    "DROP TABLE IF EXISTS tmp_migration_0042; -- cleanup done",
    "UPDATE settings SET value='on' WHERE key='maintenance' OR key='readonly'",
    "1' OR '1'='1 seen in nginx access log, client blocked",
    "rm -rf /var/cache/app/* && systemctl restart app.service",
    "curl -fsS http://127.0.0.1:8080/healthz | jq -r .status",
    "bash -c 'for f in /etc/app/*.conf; do nginx -t -c $f; done'",
    "$(date +%s) > /tmp/last-run; cat /etc/os-release | head -n 2",
    'release notes: <b>faster</b> sync, see <a href="https://example.com">docs</a>',
    "path /var/lib/app/../app/data resolved to /var/lib/app/data",
    "wget -qO- https://releases.example.com/v2.4.1/SHA256SUMS | sha256sum -c -",
    "exec sp_who2; xp_cmdshell disabled as expected",
    "<script src=/static/app.js> tag missing in index.html after upgrade",
    "${HOME}/.config/app/config.yaml: permission denied (uid=1000 gid=1000)",
    "union of two label sets: {app=web} | {tier=frontend}",
]
LEGIT_AGENTS = 50
LEGIT_REQUESTS_PER_AGENT = 200  # 10,000 requests in all
LEGIT_PACE_S = 0.125  # 8 requests/s per agent, under the edge's per-agent rate


async def _send_lookalikes(agent: AgentClient, index: int, statuses: Counter[int]) -> int:
    """One agent's share, paced under its rate limit; returns the events accepted."""
    events = EventFactory()
    resources = [Resource("deployment", "web", "2.4.1"), Resource("statefulset", "db", "15.4")]
    accepted = 0
    next_at = time.monotonic()
    for n in range(LEGIT_REQUESTS_PER_AGENT):
        # Never faster than the pace, even after a slow stretch (no catch-up bursts).
        next_at = max(next_at + LEGIT_PACE_S, time.monotonic())
        text = LOOKALIKES[(index + n) % len(LOOKALIKES)]
        if n % 3 == 0:
            batch = [events.heartbeat("degraded", text)]
        elif n % 3 == 1:
            batch = [events.command_result(n + 1, 1, "failed", text)]
        else:
            observed = events.observed_state(resources)
            observed["payload"]["resources"][0]["status"] = text
            batch = [observed, events.heartbeat("ok", text[::-1])]
        body = json.dumps({"events": batch}).encode()
        for _attempt in range(5):
            assert agent.session is not None
            async with agent.session.post(
                f"{agent.edge_url}/v1/events",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as reply:
                await reply.read()
                status = reply.status
            if status != 503:  # Kafka back-pressure: the agent retries the same batch
                break
            await asyncio.sleep(0.5)
        statuses[status] += 1
        if status == 202:
            accepted += len(batch)
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    return accepted


@pytest.mark.timeout(240)
async def test_ten_thousand_requests_of_lookalike_free_text_pass_with_none_blocked(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    fleet = [agents("acme", "prod", f"agent-{i}") for i in range(LEGIT_AGENTS)]
    before = await topic_end_offset(deployment)
    statuses: Counter[int] = Counter()
    accepted = await asyncio.gather(
        *(_send_lookalikes(agent, i, statuses) for i, agent in enumerate(fleet))
    )
    assert sum(statuses.values()) == LEGIT_AGENTS * LEGIT_REQUESTS_PER_AGENT >= 10_000
    assert statuses == Counter({202: 10_000}), statuses
    # They are really in Kafka, every event of every batch.
    assert await topic_end_offset(deployment) - before == sum(accepted)


# --- the agent grammar keeps up with the API ------------------------------------------

AGENT_POLICY = Path(__file__).resolve().parents[2] / "infra/nginx/modsecurity/agent.conf"


def test_the_agent_request_line_grammar_admits_every_agent_route() -> None:
    """A new agent route or query parameter fails here until the WAF grammar knows it."""
    found = re.search(r'SecRule REQUEST_LINE "!@rx ([^"]+)"', AGENT_POLICY.read_text())
    assert found, "the agent policy's request-line rule"
    grammar = re.compile(found[1])
    agent_routes = [op for op in OPERATIONS if op.audience == "agent"]
    assert agent_routes
    for op in agent_routes:
        path = re.sub(r"\{[^}]+\}", "ev-0b1c2d3e-17", op.path)
        targets = [path] + [f"{path}?{q.name}={MAX_WAIT_S}" for q in op.query]
        for target in targets:
            assert grammar.fullmatch(f"{op.method} {target} HTTP/1.1"), (op.name, target)
    # An event id's ':' may come percent-encoded, as URL encoders write it ...
    assert grammar.fullmatch("GET /v1/events/ev%3A0b1c%3a17 HTTP/1.1")
    # Both parameters of the poll, in either order, the ids' commas escaped or not ...
    for query in ("wait=5&taken=1,22,333", "taken=1%2C22%2c333&wait=5", "taken=7"):
        assert grammar.fullmatch(f"GET /v1/commands?{query} HTTP/1.1"), query
    # ... and nothing else in a query string, and no other escape in a path.
    assert not grammar.fullmatch("GET /v1/commands?wait=1&x=2 HTTP/1.1")
    for query in ("taken=1,", "taken=1;2", "taken=" + ",".join(["1"] * 101), "wait=1&wait=2"):
        assert not grammar.fullmatch(f"GET /v1/commands?{query} HTTP/1.1"), query
    assert not grammar.fullmatch("GET /v1/events/../x HTTP/1.1")
    for escaped in ("%2e%2e", "%2F", "%3B", "%3", "%3A%00", "%253A", "%3a%2e"):
        assert not grammar.fullmatch(f"GET /v1/events/{escaped} HTTP/1.1"), escaped

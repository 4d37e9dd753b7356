"""The edge's limits through the real nginx: rates and connections per agent
identity, body size, slow clients, and the long poll's read timeout.

The limits are read from the configuration the running edge was rendered with
(infra/nginx/edge.conf.template, values from infra/local/lib.sh), so the tests
follow an overridden stack.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from services.shared.commands import MAX_WAIT_S
from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.stack import Stack

AgentFactory = Callable[[str, str, str], AgentClient]


@dataclass(frozen=True)
class EdgeLimits:
    rate: int
    burst: int
    conn: int
    header_timeout_s: int
    body_timeout_s: int
    text: str


def edge_limits(stack: Stack) -> EdgeLimits:
    text = (stack.run_dir / "nginx" / "nginx.conf").read_text()

    def number(pattern: str) -> int:
        match = re.search(pattern, text)
        assert match, f"{pattern!r} not in the running edge's configuration"
        return int(match[1])

    return EdgeLimits(
        rate=number(r"zone=agent_rate:\S+ rate=(\d+)r/s;"),
        burst=number(r"limit_req zone=agent_rate burst=(\d+) nodelay;"),
        conn=number(r"limit_conn agent_conn (\d+);"),
        header_timeout_s=number(r"client_header_timeout (\d+)s;"),
        body_timeout_s=number(r"client_body_timeout (\d+)s;"),
        text=text,
    )


async def _send_at(
    agent: AgentClient, rate: float, duration_s: float
) -> tuple[Counter[int], float]:
    """GET requests started on a fixed schedule (open loop); statuses and the real span."""
    assert agent.session is not None
    session = agent.session
    statuses: Counter[int] = Counter()
    retry_after: set[str | None] = set()

    async def one() -> None:
        async with session.get(f"{agent.edge_url}/v1/events/ev-probe") as reply:
            await reply.read()
            statuses[reply.status] += 1
            if reply.status == 429:
                retry_after.add(reply.headers.get("Retry-After"))

    tasks = []
    start = time.monotonic()
    for n in range(int(rate * duration_s)):
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one()))
    span = time.monotonic() - start
    await asyncio.gather(*tasks)
    assert retry_after <= {"1"}, retry_after  # every 429 says when to come back
    return statuses, span


async def test_rate_limit_is_per_agent_identity(
    deployment: Deployment, agents: AgentFactory, stack: Stack
) -> None:
    """A at ten times its limit is refused at least 90 %; B, same customer, at half: never."""
    limits = edge_limits(stack)
    deployment.start_apis()
    a = agents("acme", "prod", "agent-a")
    b = agents("acme", "prod", "agent-b")
    window_s = 6.0

    # A spends its burst first, so the window measures the sustained rate.
    warm_up, _ = await _send_at(
        a, rate=limits.rate * 20, duration_s=(limits.burst + 5) / 20 / limits.rate
    )
    assert warm_up[429] > 0, warm_up

    # A is scheduled at 12x so that it still sends at least 10x if this loaded
    # machine makes the client lag; what it really sent is checked below.
    (a_statuses, a_span), (b_statuses, _) = await asyncio.gather(
        _send_at(a, rate=limits.rate * 12, duration_s=window_s),
        _send_at(b, rate=limits.rate / 2, duration_s=window_s),
    )
    a_sent = sum(a_statuses.values())
    assert a_sent / a_span >= 10 * limits.rate, f"A sent only {a_sent / a_span:.1f}/s"
    assert a_statuses[429] / a_sent >= 0.90, a_statuses
    assert set(a_statuses) <= {200, 429}, a_statuses  # 200: the probed event is pending
    assert b_statuses[429] == 0, b_statuses
    assert sum(b_statuses.values()) == int(limits.rate / 2 * window_s), b_statuses


async def test_requests_in_flight_are_limited_per_agent_identity(
    deployment: Deployment, agents: AgentFactory, stack: Stack
) -> None:
    """Long polls held open: the agent's ones over its limit get 429, another agent's none."""
    limits = edge_limits(stack)
    deployment.start_apis()
    a = agents("acme", "prod", "agent-a")
    b = agents("acme", "prod", "agent-b")

    async def polls(agent: AgentClient, count: int) -> Counter[int]:
        # A session with room for more connections than the edge allows.
        connector = aiohttp.TCPConnector(ssl=agent.ssl_context, limit=count)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def poll() -> int:
                async with session.get(f"{agent.edge_url}/v1/commands?wait=4") as reply:
                    await reply.read()
                    return reply.status

            return Counter(await asyncio.gather(*(poll() for _ in range(count))))

    a_statuses, b_statuses = await asyncio.gather(polls(a, limits.conn + 3), polls(b, 1))
    assert a_statuses == Counter({200: limits.conn, 429: 3}), a_statuses
    assert b_statuses == Counter({200: 1}), b_statuses


async def test_a_body_over_the_limit_is_refused_by_the_edge(
    deployment: Deployment, agents: AgentFactory
) -> None:
    deployment.start_apis()
    agent = agents("acme", "prod", "agent-1")
    padding = "x" * (1024 * 1024)
    status, body, content_type = await agent.post_raw(
        json.dumps({"events": [agent.heartbeat(message=padding)]}).encode()
    )
    assert (status, content_type) == (413, "application/problem+json"), body
    assert body["detail"] == "the request body exceeds 1 MiB"  # nginx's page, not the API's


async def _seconds_until_closed(context: ssl.SSLContext, edge_url: str, start: bytes) -> float:
    """Send the start of a request, then nothing; how long until the edge hangs up."""
    url = URL(edge_url)
    reader, writer = await asyncio.open_connection(url.host, url.port, ssl=context)
    began = time.monotonic()
    try:
        writer.write(start)
        await writer.drain()
        while await asyncio.wait_for(reader.read(4096), timeout=60):
            pass  # a 408 body may come before the close
    except (ConnectionError, ssl.SSLError):
        pass  # a reset is a close too (reset_timedout_connection)
    finally:
        writer.close()
    return time.monotonic() - began


async def test_slow_clients_are_cut_off(agents: AgentFactory, stack: Stack) -> None:
    """Headers that never end, and a body that stops coming, lose the connection."""
    limits = edge_limits(stack)
    agent = agents("acme", "prod", "agent-1")
    slow_headers = b"GET /v1/commands HTTP/1.1\r\nHost: localhost\r\nX-Slow: "
    slow_body = (
        b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"events": ['
    )
    header_s, body_s = await asyncio.gather(
        _seconds_until_closed(agent.ssl_context, agent.edge_url, slow_headers),
        _seconds_until_closed(agent.ssl_context, agent.edge_url, slow_body),
    )
    # Cut off by the timeouts (not at once, and not much later); the machine is
    # shared, so the bounds are loose.
    assert limits.header_timeout_s - 1 <= header_s <= limits.header_timeout_s + 10, header_s
    assert limits.body_timeout_s - 1 <= body_s <= limits.body_timeout_s + 10, body_s


def _location(text: str, prefix: str) -> str:
    start = text.index(f"location {prefix} {{")
    depth, i = 0, text.index("{", start)
    while True:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start : i + 1]
        i += 1


def test_only_the_long_poll_reads_longer_than_its_maximum_wait(stack: Stack) -> None:
    """The edge waits for the long poll longer than MAX_WAIT_S, and for nothing else."""
    text = edge_limits(stack).text
    timeouts = [int(s) for s in re.findall(r"proxy_read_timeout (\d+)s;", text)]
    poll = re.search(r"proxy_read_timeout (\d+)s;", _location(text, "/v1/commands"))
    assert poll, "the long poll's location sets its own read timeout"
    assert int(poll[1]) >= MAX_WAIT_S + 5
    # Every other read timeout (the http-level default) is shorter than a poll.
    others = list(timeouts)
    others.remove(int(poll[1]))
    assert others, "a default read timeout is set"
    assert all(t < MAX_WAIT_S for t in others), timeouts


async def test_a_long_poll_at_its_maximum_wait_is_answered(
    deployment: Deployment, agents: AgentFactory
) -> None:
    """The API's own answer at MAX_WAIT_S reaches the agent (no 504 from the edge)."""
    deployment.start_apis()
    agent = agents("acme", "prod", "agent-1")
    began = time.monotonic()
    status, body = await agent.poll_commands(MAX_WAIT_S)
    assert status == 200, body
    assert body["commands"] == []
    assert time.monotonic() - began >= MAX_WAIT_S - 1

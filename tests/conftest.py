"""Fixtures for tests that run on the real stack (Kafka, PostgreSQL, nginx).

``make test`` starts the stack before pytest; a test that needs it and finds it
down fails with a message saying so, it is never skipped.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from services.gateway_auth.ca import CertificateAuthority
from services.gateway_auth.pki import load_issuing_ca
from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.stack import FleetEnv, Stack, prepare_template


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def stack() -> Stack:
    stack = Stack()
    db = stack.database
    needed = {
        "Kafka": stack.kafka_bootstrap.split(",")[0],
        "PostgreSQL": f"{db.database_host}:{db.database_port}",
        "nginx": stack.edge_url.removeprefix("https://"),
    }
    down = [name for name, address in needed.items() if not _listening(address)]
    if down:
        pytest.fail(
            f"{', '.join(down)} not running: start the stack with `bash infra/local/stack.sh up` "
            "(make test does it)"
        )
    prepare_template(stack)
    return stack


@pytest.fixture(scope="session")
def issuing_ca(stack: Stack) -> CertificateAuthority:
    return load_issuing_ca(stack.pki_dir)


@pytest.fixture
def deployment(
    stack: Stack, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Deployment]:
    """An empty deployment: own topics and database, no processes yet."""
    partitions = getattr(request, "param", 4)
    log_dir = stack.run_dir / "test-logs" / request.node.name
    deployment = Deployment(FleetEnv.new(stack, partitions), log_dir).create()
    yield deployment
    deployment.close()


@pytest.fixture
async def agents(
    stack: Stack, issuing_ca: CertificateAuthority, tmp_path: Path
) -> AsyncIterator[Callable[[str, str, str], AgentClient]]:
    """Makes connected test agents: ``agent = agents("customer", "env", "agent")``."""
    made: list[AgentClient] = []

    def make(customer: str, environment: str, agent: str) -> AgentClient:
        test_agent = AgentClient.issue(
            issuing_ca, stack.pki_dir, stack.edge_url, (customer, environment, agent), tmp_path
        ).open()
        made.append(test_agent)
        return test_agent

    yield make
    for test_agent in made:
        await test_agent.close()

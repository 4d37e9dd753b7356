"""Every HTTP service waits for its dependencies at start-up and, at the deadline, stops
with one clear message: what, where, how many attempts, the setting, the last error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.support.stack import Stack

DEADLINE_S = 1.5


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("module", "prefix", "first"),
    [
        # The API needs Kafka to accept anything; gateway_auth its identity tables.
        ("services.api", "FLEETPLANE_API_", "Kafka"),
        ("services.gateway_auth", "FLEETPLANE_GATEWAY_AUTH_", "PostgreSQL"),
    ],
)
def test_a_service_whose_dependencies_are_down_stops_at_its_deadline(
    stack: Stack, module: str, prefix: str, first: str
) -> None:
    port = closed_port()
    env = {
        **os.environ,
        "FLEETPLANE_PKI_DIR": str(stack.pki_dir),
        "FLEETPLANE_DATABASE_PORT": str(port),
        "FLEETPLANE_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
        f"{prefix}PORT": str(closed_port()),
        f"{prefix}STARTUP_TIMEOUT_S": str(DEADLINE_S),
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", module],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert f"cannot start: {first} at " in result.stderr, result.stderr
    assert "is not usable after" in result.stderr, result.stderr
    assert f"({prefix}STARTUP_TIMEOUT_S); last error: " in result.stderr, result.stderr
    assert "listening on" not in result.stderr
    # The deadline, plus interpreter start-up and one attempt's timeout at most.
    assert elapsed < DEADLINE_S + 20, elapsed

"""docker-compose.yml's entry points and scripts, run as processes in this virtualenv.

No Docker engine: every Python entry point compose names is run with ``--help``
and its compose arguments, the container health check script is run against a
server with the API's own TLS set-up, and the rendered edge configuration is
checked against its template. The static wiring is checked in tests/unit/compose.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from services.api.settings import ApiSettings
from services.gateway_auth.pki import init_pki
from services.shared.web.tls import server_ssl_context
from tests.support.compose import REPO_ROOT, Invocation, our_services, parsed_invocations

RENDER_EDGE: Final = REPO_ROOT / "infra" / "compose" / "render_edge.py"
HEALTHCHECK_SCRIPT: Final = REPO_ROOT / "infra" / "compose" / "healthcheck.py"


def _invocation_params() -> list[Any]:
    params = []
    for name in our_services():
        for invocation in parsed_invocations(name):
            params.append(pytest.param(name, invocation, id=f"{name}:{invocation.module}"))
    return params


@pytest.mark.parametrize(("service_name", "invocation"), _invocation_params())
def test_entry_point_answers_help(
    service_name: str, invocation: Invocation, tmp_path: Path
) -> None:
    # Proves the module exists, imports, and accepts the compose arguments. Kafka
    # and PostgreSQL point at a closed port, so an entry point that ignores --help
    # fails fast instead of touching a running stack.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FLEETPLANE_")}
    env |= {
        "PYTHONPATH": str(REPO_ROOT),
        "FLEETPLANE_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "FLEETPLANE_DATABASE_HOST": "127.0.0.1",
        "FLEETPLANE_DATABASE_PORT": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", invocation.module, *invocation.args, "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{service_name}: exit {result.returncode}\n{result.stderr}"
    assert "usage:" in result.stdout, f"{service_name}: no usage text\n{result.stdout}"


def test_edge_config_is_rendered_from_the_current_template() -> None:
    result = subprocess.run(
        [sys.executable, str(RENDER_EDGE), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- the health check script -------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/healthz" else 503
        body = b'{"status":"ok"}' if status == 200 else b'{"status":"sick"}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest's output clean


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    init_pki(directory)
    return directory


@pytest.fixture
def api_like_server(pki: Path) -> Iterator[int]:
    """An HTTPS server with the API's own TLS set-up and the development PKI."""
    settings = ApiSettings(
        tls_cert=pki / "api-server.pem",
        tls_key=pki / "api-server.key",
        edge_ca=pki / "internal-ca.pem",
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = server_ssl_context(
        settings.tls_cert, settings.tls_key, settings.edge_ca
    ).wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK_SCRIPT), "--timeout", "5", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_healthcheck_passes_on_a_verified_2xx(api_like_server: int, pki: Path) -> None:
    url = f"https://127.0.0.1:{api_like_server}/healthz"
    result = _healthcheck("--cafile", str(pki / "internal-ca.pem"), url)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("cafile", "path"),
    [
        pytest.param("root-ca.pem", "/healthz", id="certificate-from-another-ca"),
        pytest.param("internal-ca.pem", "/sick", id="non-2xx-answer"),
    ],
)
def test_healthcheck_fails(api_like_server: int, pki: Path, cafile: str, path: str) -> None:
    url = f"https://127.0.0.1:{api_like_server}{path}"
    result = _healthcheck("--cafile", str(pki / cafile), url)
    assert result.returncode == 1, result.stderr
    assert "unhealthy" in result.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    result = _healthcheck("http://127.0.0.1:1/healthz")
    assert result.returncode == 1
    assert "unhealthy" in result.stderr


def test_healthcheck_needs_a_ca_for_https() -> None:
    result = _healthcheck("https://127.0.0.1:1/healthz")
    assert result.returncode == 2
    assert "--cafile" in result.stderr

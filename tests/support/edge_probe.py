"""Extra nginx edges rendered from the edge template on their own ports, for
measurements (bench/edge.py) and probes (tests/integration/test_edge_scans.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from infra.nginx.render import EdgeConfig, EdgeLimits, render_edge, render_noop_upstream

REPO_ROOT = Path(__file__).resolve().parents[2]
LIB_SH = REPO_ROOT / "infra" / "local" / "lib.sh"

# What infra/local/nginx.sh renders the template with, by lib.sh variable.
_LIB_VALUES = {
    "NGINX_BIN": "NGINX_BIN",
    "NGINX_MODULES": "NGINX_MODULES",
    "NGINX_WORKERS": "NGINX_WORKERS",
    "CRS_SETUP": "CRS_SETUP",
    "CRS_RULES": "CRS_RULES",
    "PROBE_BASE_PORT": "EDGE_PROBE_BASE_PORT",
    # The stack edge's limits, which benchmarks record beside their figures.
    "AGENT_RATE": "EDGE_AGENT_RATE",
    "AGENT_BURST": "EDGE_AGENT_BURST",
    "AGENT_CONN": "EDGE_AGENT_CONN",
    "EDGE_CONN": "EDGE_CONN",
    "API_CONNS": "EDGE_API_CONNS",
}


def lib_settings() -> dict[str, str]:
    """The edge settings as infra/local/lib.sh resolves them (environment overrides included)."""
    names = " ".join(_LIB_VALUES.values())
    script = f'source "$1"; for n in {names}; do printf "%s=%s\\0" "$n" "${{!n}}"; done'
    out = subprocess.run(
        ["bash", "-c", script, "lib", str(LIB_SH)], capture_output=True, check=True
    ).stdout.decode()
    resolved = dict(item.split("=", 1) for item in out.split("\0") if item)
    return {key: resolved[var] for key, var in _LIB_VALUES.items()}


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class NginxProcess:
    """One nginx master started here in the foreground (daemon off) and stopped by its pid."""

    def __init__(self, nginx_bin: str, prefix: Path, conf: Path) -> None:
        self.nginx_bin = nginx_bin
        self.prefix = prefix
        self.conf = conf
        self.process: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        error_log = self.prefix / "logs" / "error.log"
        return [self.nginx_bin, "-p", str(self.prefix), "-e", str(error_log), "-c", str(self.conf)]

    def start(self, ports: list[int]) -> None:
        busy = [p for p in ports if _port_open(p)]
        if busy:
            raise RuntimeError(
                f"127.0.0.1:{busy} already in use; set FLEETPLANE_EDGE_PROBE_BASE_PORT"
            )
        test = subprocess.run([*self._command(), "-t", "-q"], capture_output=True, text=True)
        if test.returncode != 0:
            raise RuntimeError(f"nginx -t failed for {self.conf}:\n{test.stderr}")
        self.process = subprocess.Popen(
            [*self._command(), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while not all(_port_open(p) for p in ports):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.prefix / "logs" / "error.log").read_text()[-2000:]
                raise RuntimeError(f"nginx ({self.conf}) did not start:\n{tail}")
            time.sleep(0.1)

    def worker_pids(self) -> list[int]:
        if self.process is None:
            return []
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return [int(p) for p in children.read_text().split()]
        except OSError:
            return []

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: master and workers
            self.process.wait(timeout=15)


class EdgeProbe:
    """An extra edge rendered from edge.conf.template, proxying to a no-op upstream.

    Its ports come from lib.sh's EDGE_PROBE_BASE_PORT (agent listener, operator
    listener, no-op upstream, enrollment listener, stub_status). The configuration is the
    native edge's, rendered by the same renderer (infra/nginx/render.py) with
    these values: limits from ``limits`` (default: none that a benchmark or a
    scan would reach); with ``agent_waf=False``, the agent listener's WAF off; with
    ``agent_mtls=False``, no client certificate asked for on the agent listener,
    for tools that cannot present one.
    """

    def __init__(
        self,
        run_dir: Path,
        pki_dir: Path,
        *,
        agent_waf: bool = True,
        agent_mtls: bool = True,
        limits: EdgeLimits | None = None,
    ) -> None:
        self.run_dir = run_dir = run_dir.resolve()
        self.pki_dir = pki_dir = pki_dir.resolve()
        settings = lib_settings()
        base = int(settings["PROBE_BASE_PORT"])
        self.agent_port, self.operator_port, self.upstream_port = base, base + 1, base + 2
        self.enroll_port = base + 3
        self.status_port = base + 4
        self.nginx_bin = settings["NGINX_BIN"]
        edge_dir, noop_dir = run_dir / "edge", run_dir / "upstream"
        for folder in (edge_dir, noop_dir):
            (folder / "logs").mkdir(parents=True, exist_ok=True)
            (folder / "temp").mkdir(parents=True, exist_ok=True)
        config = EdgeConfig(
            nginx_dir=str(edge_dir),
            pki_dir=str(pki_dir),
            nginx_modules=settings["NGINX_MODULES"],
            workers=settings["NGINX_WORKERS"],
            edge_port=self.agent_port,
            operator_port=self.operator_port,
            enroll_port=self.enroll_port,
            status_port=self.status_port,
            api_servers=[f"127.0.0.1:{self.upstream_port}"],
            gateway_auth=f"127.0.0.1:{self.upstream_port}",
            crs_setup=settings["CRS_SETUP"],
            crs_rules=settings["CRS_RULES"],
            limits=limits or EdgeLimits.unlimited(),
            agent_waf=agent_waf,
            agent_mtls=agent_mtls,
        )
        (edge_dir / "nginx.conf").write_text(render_edge(config))
        (noop_dir / "nginx.conf").write_text(
            render_noop_upstream(str(noop_dir), str(pki_dir), self.upstream_port)
        )
        self.audit_log = edge_dir / "logs" / "modsec_audit.log"
        self.error_log = edge_dir / "logs" / "error.log"
        self.edge = NginxProcess(self.nginx_bin, edge_dir, edge_dir / "nginx.conf")
        self.upstream = NginxProcess(self.nginx_bin, noop_dir, noop_dir / "nginx.conf")

    @property
    def agent_url(self) -> str:
        return f"https://127.0.0.1:{self.agent_port}"

    @property
    def operator_url(self) -> str:
        return f"https://127.0.0.1:{self.operator_port}"

    def start(self) -> EdgeProbe:
        self.upstream.start([self.upstream_port])
        try:
            self.edge.start(
                [self.agent_port, self.operator_port, self.enroll_port, self.status_port]
            )
        except BaseException:
            self.upstream.stop()
            raise
        return self

    def stop(self) -> None:
        self.edge.stop()
        self.upstream.stop()

    def __enter__(self) -> EdgeProbe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

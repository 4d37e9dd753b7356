"""External tools (vegeta, GoTestWAF, sslyze), installed on first use into the project's cache,
and extra nginx edges rendered from the edge template for measurements and probes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from infra.nginx.render import EdgeConfig, EdgeLimits, render_edge, render_noop_upstream

CACHE = Path(os.environ.get("FLEETPLANE_CACHE", Path.home() / ".cache" / "fleetplane"))
GOBIN = CACHE / "go-bin"
VEGETA_MODULE = "github.com/tsenart/vegeta/v12@v12.13.0"


def go_tool(name: str, module: str) -> Path:
    binary = GOBIN / name
    if not binary.exists():
        go = shutil.which("go") or "/usr/local/go/bin/go"
        print(f"  installing {module} (once)", flush=True)
        subprocess.run([go, "install", module], env={**os.environ, "GOBIN": str(GOBIN)}, check=True)
    return binary


class Vegeta:
    def attack(
        self,
        *,
        url: str,
        body: Path,
        cert: Path,
        key: Path,
        root_ca: Path,
        duration_s: int,
        workers: int,
    ) -> dict[str, Any]:
        """POST ``body`` to ``url`` as fast as ``workers`` connections allow.

        Returns requests/s of successful answers, success ratio and latency quantiles.
        """
        binary = go_tool("vegeta", VEGETA_MODULE)
        target = f"POST {url}\nContent-Type: application/json\n@{body}\n"
        attack = subprocess.run(
            [
                str(binary),
                "attack",
                "-rate=0",
                f"-max-workers={workers}",
                f"-workers={workers}",
                f"-duration={duration_s}s",
                f"-cert={cert}",
                f"-key={key}",
                f"-root-certs={root_ca}",
                "-keepalive=true",
                "-timeout=10s",
            ],
            input=target.encode(),
            capture_output=True,
            check=True,
        )
        report = subprocess.run(
            [str(binary), "report", "-type=json"],
            input=attack.stdout,
            capture_output=True,
            check=True,
        )
        parsed: dict[str, Any] = json.loads(report.stdout)
        latencies = parsed["latencies"]
        return {
            "rps": float(parsed["throughput"]),
            "success": float(parsed["success"]),
            "p50_ms": latencies["50th"] / 1e6,
            "p99_ms": latencies["99th"] / 1e6,
            "status_codes": parsed["status_codes"],
        }


vegeta = Vegeta()


# --- extra edges: the edge template on its own ports, for benchmarks and probes ---

REPO_ROOT = Path(__file__).resolve().parents[1]
LIB_SH = REPO_ROOT / "infra" / "local" / "lib.sh"

# What infra/local/nginx.sh renders the template with, by lib.sh variable.
_LIB_VALUES = {
    "NGINX_BIN": "NGINX_BIN",
    "NGINX_MODULES": "NGINX_MODULES",
    "NGINX_WORKERS": "NGINX_WORKERS",
    "CRS_SETUP": "CRS_SETUP",
    "CRS_RULES": "CRS_RULES",
    "PROBE_BASE_PORT": "EDGE_PROBE_BASE_PORT",
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


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time the processes used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


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
            # The no-op upstream also answers the per-request certificate check.
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


# --- GoTestWAF and sslyze ----------------------------------------------------------

# v0.5.7 is what the project planned on; the module proxy here answers 403 for it
# ("not available") and serves v0.5.8, the next patch release.
GOTESTWAF_MODULE = "github.com/wallarm/gotestwaf@v0.5.8"


def _go() -> str:
    return shutil.which("go") or "/usr/local/go/bin/go"


def gotestwaf() -> tuple[Path, Path]:
    """The GoTestWAF binary and its module folder (testcases/, config.yaml), built once.

    ``go install module@version`` fails here (it asks the proxy for the module's
    version list, which it refuses), so the module is downloaded and built from
    the module cache instead.
    """
    info = json.loads(
        subprocess.run(
            [_go(), "mod", "download", "-json", GOTESTWAF_MODULE], capture_output=True, check=True
        ).stdout
    )
    module_dir = Path(info["Dir"])
    binary = GOBIN / f"gotestwaf-{info['Version']}"
    if not binary.exists():
        print(f"  building {GOTESTWAF_MODULE} (once)", flush=True)
        GOBIN.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [_go(), "build", "-o", str(binary), "./cmd/gotestwaf"], cwd=module_dir, check=True
        )
    return binary, module_dir


def run_gotestwaf(
    url: str,
    report_dir: Path,
    name: str,
    *,
    test_cases: Path | None = None,
    workers: int = 4,
) -> dict[str, Any]:
    """Run GoTestWAF against ``url`` with its own test cases (or ``test_cases``).

    A block is a 403; 200, 202 (the no-op upstream's answer) and 404 are passes.
    Returns the JSON report, which is also kept as ``<report_dir>/<name>.json``.
    """
    binary, module_dir = gotestwaf()
    report_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            str(binary),
            "--url",
            url,
            "--testCasesPath",
            str(test_cases or module_dir / "testcases"),
            "--configPath",
            str(module_dir / "config.yaml"),
            "--reportFormat",
            "json",
            "--noEmailReport",
            "--reportPath",
            str(report_dir),
            "--reportName",
            name,
            "--blockStatusCodes",
            "403",
            "--passStatusCodes",
            "200,202,404",
            "--workers",
            str(workers),
            "--sendDelay",
            "0",
            # 0 makes GoTestWAF v0.5.8 panic (rand.Intn(0)); 1 ms is the least.
            "--randomDelay",
            "1",
            "--skipWAFIdentification",
            "--quiet",
        ],
        capture_output=True,
        check=True,
        timeout=600,
    )
    report: dict[str, Any] = json.loads((report_dir / f"{name}.json").read_text())
    return report


SSLYZE_VERSION = "6.3.1"


def sslyze() -> Path:
    """A Python with sslyze, in its own virtualenv in the cache.

    Not in the project's dev extras: sslyze 6.3.1 requires cryptography < 47 and
    the project pins cryptography 50.
    """
    venv = CACHE / f"sslyze-{SSLYZE_VERSION}"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"  installing sslyze {SSLYZE_VERSION} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"sslyze=={SSLYZE_VERSION}"], check=True
        )
    return python


def run_sslyze(
    target: str,
    out: Path,
    *,
    ca_file: Path,
    cert: Path | None = None,
    key: Path | None = None,
) -> tuple[int, dict[str, Any], str]:
    """Scan ``host:port`` against Mozilla's "intermediate" configuration.

    ``ca_file`` is the root the server's chain is validated against (ours is not
    in sslyze's public trust stores); ``cert`` and ``key`` are presented when the
    server asks for a client certificate. Returns sslyze's exit status (0:
    compliant), its JSON output and its text output.
    """
    command = [
        str(sslyze()),
        "-m",
        "sslyze",
        "--mozilla_config=intermediate",
        f"--certinfo_ca_file={ca_file}",
        f"--json_out={out}",
    ]
    if cert is not None and key is not None:
        command += [f"--cert={cert}", f"--key={key}"]
    result = subprocess.run(
        [*command, target], capture_output=True, text=True, timeout=300, check=False
    )
    parsed: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    return result.returncode, parsed, result.stdout + result.stderr

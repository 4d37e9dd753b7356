"""GoTestWAF and sslyze, installed on first use into the project's cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.gotools import CACHE, GOBIN, go_binary

# v0.5.7 is what the project planned on; the module proxy here answers 403 for it
# ("not available") and serves v0.5.8, the next patch release.
GOTESTWAF_MODULE = "github.com/wallarm/gotestwaf@v0.5.8"


def gotestwaf() -> tuple[Path, Path]:
    """The GoTestWAF binary and its module folder (testcases/, config.yaml), built once.

    ``go install module@version`` fails here (it asks the proxy for the module's
    version list, which it refuses), so the module is downloaded and built from
    the module cache instead.
    """
    info = json.loads(
        subprocess.run(
            [go_binary(), "mod", "download", "-json", GOTESTWAF_MODULE],
            capture_output=True,
            check=True,
        ).stdout
    )
    module_dir = Path(info["Dir"])
    binary = GOBIN / f"gotestwaf-{info['Version']}"
    if not binary.exists():
        print(f"  building {GOTESTWAF_MODULE} (once)", flush=True)
        GOBIN.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [go_binary(), "build", "-o", str(binary), "./cmd/gotestwaf"], cwd=module_dir, check=True
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

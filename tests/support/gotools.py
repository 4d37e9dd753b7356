"""Go tools installed on first use into the project's cache (``FLEETPLANE_CACHE``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("FLEETPLANE_CACHE", Path.home() / ".cache" / "fleetplane"))
GOBIN = CACHE / "go-bin"


def go_tool(name: str, module: str) -> Path:
    binary = GOBIN / name
    if not binary.exists():
        go = go_binary()
        print(f"  installing {module} (once)", flush=True)
        subprocess.run([go, "install", module], env={**os.environ, "GOBIN": str(GOBIN)}, check=True)
    return binary


def go_binary() -> str:
    """The ``go`` command: on the PATH, else where the Go installer puts it."""
    return shutil.which("go") or "/usr/local/go/bin/go"

"""infra/k8s/backup: every container's command starts (a process each, hence not a unit test)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.manifests import REPO_ROOT, containers, documents


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "args",
    sorted({tuple(c["args"]) for d in documents() for c in containers(d)}),
    ids=lambda a: " ".join(a),
)
def test_each_command_answers_help(args: tuple[str, ...]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout

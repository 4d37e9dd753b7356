"""Reading infra/k8s/backup/backup.yaml: its documents and their containers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import yaml

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
MANIFESTS: Final = REPO_ROOT / "infra" / "k8s" / "backup" / "backup.yaml"


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d is not None]


def containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    if document["kind"] == "CronJob":
        pod = document["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    else:
        pod = document["spec"]["template"]["spec"]
    found: list[dict[str, Any]] = pod["containers"]
    return found

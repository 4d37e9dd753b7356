"""infra/k8s/backup: CronJobs that never overlap, the exporter, and key custody.

That every container's command starts: tests/integration/test_backup_manifest_commands.py.
"""

from __future__ import annotations

from typing import Any, Final

import pytest
from pydantic_settings import BaseSettings

from services.backup.settings import BackupSettings, S3Settings
from services.shared.settings import DatabaseSettings, KafkaSettings
from tests.support.manifests import containers, documents

SETTINGS: Final = (DatabaseSettings, KafkaSettings, S3Settings, BackupSettings)


def env_names(cls: type[BaseSettings]) -> set[str]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    return {(prefix + name).upper() for name in cls.model_fields}


def test_cron_jobs_never_overlap_and_run_every_one_shot_verb() -> None:
    jobs = [d for d in documents() if d["kind"] == "CronJob"]
    assert {c["args"][1] for j in jobs for c in containers(j)} == {"backup", "verify", "prune"}
    assert all(j["spec"]["concurrencyPolicy"] == "Forbid" for j in jobs)


def test_the_exporter_serves_metrics_from_the_bucket_only() -> None:
    [exporter] = [d for d in documents() if d["kind"] == "Deployment"]
    [container] = containers(exporter)
    assert container["args"] == ["services.backup", "schedule", "--metrics-only"]
    names = {e["name"] for e in container["env"]}
    assert "FLEETPLANE_BACKUP_METRICS_HOST" in names
    assert not any("AGE" in n or "DATABASE_PASSWORD" in n for n in names)


def test_only_verify_holds_the_age_identity() -> None:
    holders = {
        c["name"]
        for d in documents()
        for c in containers(d)
        for e in c.get("env", [])
        if e["name"].startswith("FLEETPLANE_BACKUP_AGE_IDENTITY")
    }
    assert holders == {"verify"}


@pytest.mark.parametrize(
    "document", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_containers_set_only_variables_the_backup_service_reads(document: dict[str, Any]) -> None:
    known = set().union(*(env_names(cls) for cls in SETTINGS))
    for container in containers(document):
        unknown = {e["name"] for e in container.get("env", [])} - known
        assert not unknown, f"{container['name']} sets variables nothing reads: {unknown}"

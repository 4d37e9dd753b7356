"""docs/runbooks/restore.md, run as written: every ``sh`` block, in order, in one shell."""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pyrage
import pytest

from services.backup import jobs, postgres
from services.backup.settings import BackupSettings, S3Settings
from services.backup.storage import S3Storage
from services.shared.operator_keys import parse_token
from tests.support.deployment import Deployment
from tests.support.stack import ROOT

RUNBOOK = ROOT / "docs/runbooks/restore.md"


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.timeout(120)
def test_the_restore_runbook_restores_a_lost_database(
    deployment: Deployment, tmp_path: Path
) -> None:
    blocks = shell_blocks(RUNBOOK.read_text())
    assert len(blocks) >= 5
    key_file = tmp_path / "key.txt"
    key_file.write_text(f"# test key\n{pyrage.x25519.Identity.generate()}\n")
    s3 = S3Settings(prefix=f"test-{uuid.uuid4().hex[:10]}")
    storage = S3Storage(s3)
    db = deployment.fleet.database
    ctx = jobs.Context(db, BackupSettings(age_identity_file=key_file), s3, storage)
    key_id, _secret = parse_token(deployment.operator_key("acme"))
    try:
        backup_id = jobs.backup(ctx).backup_id
        started = postgres.clock_floor()
        env = {
            **os.environ,
            "PATH": f"{ROOT / '.venv/bin'}:{os.environ['PATH']}",
            "FLEETPLANE_DATABASE_HOST": db.database_host,
            "FLEETPLANE_DATABASE_PORT": str(db.database_port),
            "FLEETPLANE_DATABASE_NAME": db.database_name,
            "FLEETPLANE_DATABASE_USER": db.database_user,
            "FLEETPLANE_DATABASE_PASSWORD": db.database_password.get_secret_value(),
            "FLEETPLANE_KAFKA_BOOTSTRAP": deployment.fleet.stack.kafka_bootstrap,
            "FLEETPLANE_EVENTS_TOPIC": deployment.fleet.events_topic,
            "FLEETPLANE_IDENTITY_TOPIC": deployment.fleet.identity_topic,
            "FLEETPLANE_S3_PREFIX": s3.prefix,
            "FLEETPLANE_BACKUP_AGE_IDENTITY_FILE": str(key_file),
            "BACKUP_ID": backup_id,
        }
        script = "set -euo pipefail\n" + "\n".join(blocks)
        done = subprocess.run(
            ["bash", "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=110
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"restored backup {backup_id}" in done.stdout
        with postgres.connect(db) as conn:
            keys = conn.execute("SELECT key_id FROM operator_keys").fetchall()
            epoch = conn.execute("SELECT last_value FROM ownership_epoch_seq").fetchone()
        assert [k[0] for k in keys] == [key_id]
        assert epoch is not None
        assert epoch[0] >= started
        assert epoch[0] <= time.time_ns() // 1000
    finally:
        storage.delete([o.key for o in storage.list_objects(s3.prefix + "/")])

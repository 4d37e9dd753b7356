"""``make bench ONLY=backup``: backup and restore of generated databases, encrypted.

Two databases of the project's schema filled with realistic rows (event records
with hashed ids, environments with observed state; no compressible blob): about
1 GiB and about 100 MiB. Each is backed up with ``python -m services.backup
backup`` (age encryption on) and restored into an empty database with
``restore``, both as the CLI runs them; peak memory is the backup process tree's
(the Python process and its pg_dump), from wait4. The issue's bounds: backup
<= 60 s and restore <= 120 s for 1 GiB, and backup memory within 1.5x between
the two sizes (constant memory whatever the size).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pyrage

from services.backup.settings import S3Settings
from services.backup.storage import S3Storage
from tests.support.deployment import Deployment
from tests.support.stack import ROOT, FleetEnv, Stack, drop_database, prepare_template

GIB = 1024**3
# Rows per generated chunk; each chunk is one transaction.
CHUNK = 50_000


def _fill(dsn: str, target_bytes: int) -> int:
    """Add event records (and environments with observed state) until the database
    is at least ``target_bytes``; returns its size."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO environments (customer_id, environment_id, last_heartbeat_at, "
            "agent_version, health, observed_state, observed_revision, observed_reports) "
            "SELECT 'cust-' || (g % 48), 'env-' || g, now(), '1.' || (g % 20) || '.0', 'ok', "
            "(SELECT jsonb_agg(jsonb_build_object('kind', 'deployment', 'name', "
            "md5(g::text || r::text), 'version', '2.' || r, 'status', 'running')) "
            "FROM generate_series(1, 12) r), g % 7, g % 1000 FROM generate_series(1, 5000) g"
        )
        start = 0
        while True:
            row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
            size = int(row[0]) if row else 0
            if size >= target_bytes:
                return size
            conn.execute(
                "INSERT INTO event_records (customer_id, agent_id, event_id, environment_id, "
                'event_type, boot_id, seq, status, reason, partition, "offset", epoch, '
                "accepted_at) SELECT 'cust-' || (g %% 48), 'agent-' || (g %% 2400), "
                "md5(g::text || 'event'), 'env-' || (g %% 5000), "
                "(ARRAY['heartbeat', 'observed_state', 'command_result'])[1 + g %% 3], "
                "md5((g / 1000)::text), g %% 100000, 'applied', "
                "CASE WHEN g %% 50 = 0 THEN 'stale sequence ' || md5(g::text) END, g %% 12, g, "
                "1 + g %% 9, now() - make_interval(secs => g %% 86400) "
                "FROM generate_series(%s, %s) g",
                (start, start + CHUNK - 1),
            )
            start += CHUNK


def _timed(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS MiB of the process tree) of one CLI run; raises on failure."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.backup", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - started
    out = (proc.stdout.read() if proc.stdout else b"").decode()
    err = (proc.stderr.read() if proc.stderr else b"").decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"services.backup {' '.join(args)} failed:\n{out}\n{err[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024


def _one(stack: Stack, size_bytes: int, key_file: Path, prefix: str) -> dict[str, float]:
    deployment = Deployment(FleetEnv.new(stack, 12), stack.run_dir / "bench-logs").create()
    restored = f"{deployment.fleet.database_name}_r"
    try:
        size = _fill(stack.admin_dsn(deployment.fleet.database_name), size_bytes)
        env = {
            **deployment.fleet.service_env(),
            "FLEETPLANE_S3_PREFIX": prefix,
            "FLEETPLANE_BACKUP_AGE_IDENTITY_FILE": str(key_file),
        }
        backup_s, rss = _timed(["backup"], env)
        with psycopg.connect(stack.admin_dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{restored}"')
        target = stack.admin_dsn(restored)
        restore_s, _ = _timed(["restore", "--target", target], env)
        return {
            "db_gib": round(size / GIB, 3),
            "backup_s": round(backup_s, 1),
            "restore_s": round(restore_s, 1),
            "peak_rss_mib": round(rss, 1),
        }
    finally:
        drop_database(stack, restored)
        deployment.close()


def run(stack: Stack) -> tuple[dict[str, Any], dict[str, Any]]:
    prepare_template(stack)
    key_file = stack.run_dir / "bench-backup-age.key"
    key_file.write_text(f"{pyrage.x25519.Identity.generate()}\n")
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    storage = S3Storage(S3Settings(prefix=prefix))
    try:
        small = _one(stack, 100 * 1024**2, key_file, prefix)
        big = _one(stack, GIB, key_file, prefix)
    finally:
        storage.delete([o.key for o in storage.list_objects(prefix + "/")])
        key_file.unlink(missing_ok=True)
    figures = {
        **big,
        "small": small,
        "rss_ratio": round(big["peak_rss_mib"] / small["peak_rss_mib"], 2),
    }
    parameters = {
        "encryption": "age",
        "pg_dump_compress": 1,
        "part_size_mib": S3Settings().part_size_mib,
        "targets_bytes": {"big": GIB, "small": 100 * 1024**2},
    }
    return figures, parameters

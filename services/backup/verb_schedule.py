"""Run backup, verify and prune on a schedule, serving /metrics.

Runs backup, then verify of that backup, then prune, at each time of
FLEETPLANE_BACKUP_SCHEDULE (cron syntax); serves Prometheus metrics on
FLEETPLANE_BACKUP_METRICS_HOST:PORT. Stops on SIGTERM or SIGINT.
"""

# For the native stack. In Kubernetes the one-shot verbs run as CronJobs instead;
# the gauges here are read back from the manifests in the bucket (not from this
# process's memory), so the same numbers come out whoever took the backups.

from __future__ import annotations

import argparse
import logging
import signal
import threading
from datetime import UTC, datetime

from croniter import croniter
from prometheus_client import CollectorRegistry, start_http_server

from services.backup import jobs
from services.backup.crypto import CryptoError
from services.backup.postgres import BackupBusy, DatabaseUnavailable
from services.backup.storage import StorageError
from services.shared import metrics

logger = logging.getLogger(__name__)


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cron", help="cron expression (default: FLEETPLANE_BACKUP_SCHEDULE)")
    p.add_argument(
        "--port", type=int, help="metrics port (default: FLEETPLANE_BACKUP_METRICS_PORT)"
    )
    p.add_argument("--once", action="store_true", help="run one cycle now, then exit")
    p.add_argument(
        "--metrics-only",
        action="store_true",
        help="run nothing: serve the metrics read back from the bucket, refreshed every "
        "minute (the exporter beside CronJobs that run the one-shot verbs)",
    )


class Gauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.last_success = metrics.gauge(registry, metrics.BACKUP_LAST_SUCCESS)
        self.duration = metrics.gauge(registry, metrics.BACKUP_DURATION)
        self.size = metrics.gauge(registry, metrics.BACKUP_SIZE)
        self.failures = metrics.counter(registry, metrics.BACKUP_FAILURES)
        self.last_verified = metrics.gauge(registry, metrics.BACKUP_LAST_VERIFIED)
        for verb in ("backup", "verify", "prune"):
            self.failures.labels(verb)

    def refresh(self, ctx: jobs.Context) -> None:
        """Set the gauges from the bucket's manifests and verification records."""
        items = jobs.listing(ctx)
        if items:
            newest = items[0].manifest
            self.last_success.set(newest.finished_at.timestamp())
            self.duration.set((newest.finished_at - newest.started_at).total_seconds())
            self.size.set(newest.size)
        verified = next((i for i in items if i.verification and i.verification.ok), None)
        if verified is not None:
            self.last_verified.set(verified.manifest.finished_at.timestamp())


_EXPECTED = (jobs.BackupFailure, StorageError, DatabaseUnavailable, CryptoError, BackupBusy)


def cycle(ctx: jobs.Context, gauges: Gauges) -> bool:
    """One backup, verify and prune; failures are logged and counted, never raised."""
    ok = True
    backup_id = None
    try:
        backup_id = jobs.backup(ctx).backup_id
        logger.info("backup %s done", backup_id)
    except _EXPECTED as e:
        gauges.failures.labels("backup").inc()
        logger.error("backup failed: %s", e)
        ok = False
    if backup_id is not None:
        try:
            result = jobs.verify(ctx, backup_id)
            if not result.ok:
                raise jobs.BackupFailure(result.detail)
            logger.info("backup %s verified", backup_id)
        except (*_EXPECTED, jobs.BackupFailure) as e:
            gauges.failures.labels("verify").inc()
            logger.error("verify of %s failed: %s", backup_id, e)
            ok = False
    try:
        pruned = jobs.prune(ctx)
        logger.info("prune deleted %d backups", len(pruned.deleted))
    except _EXPECTED as e:
        gauges.failures.labels("prune").inc()
        logger.error("prune failed: %s", e)
        ok = False
    try:
        gauges.refresh(ctx)
    except StorageError as e:
        logger.error("reading the bucket for metrics failed: %s", e)
    return ok


def run(args: argparse.Namespace, ctx: jobs.Context) -> int:
    expression = args.cron or ctx.settings.schedule
    if not croniter.is_valid(expression):
        raise jobs.BackupFailure(f"not a cron expression: {expression!r}")
    registry = CollectorRegistry()
    gauges = Gauges(registry)
    if args.once:
        return 0 if cycle(ctx, gauges) else 1
    port = args.port or ctx.settings.metrics_port
    server, thread = start_http_server(port, addr=ctx.settings.metrics_host, registry=registry)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        gauges.refresh(ctx)
    except StorageError as e:
        logger.error("reading the bucket for metrics failed: %s", e)
    logger.info(
        "schedule %r; metrics on http://%s:%d/metrics", expression, ctx.settings.metrics_host, port
    )
    if args.metrics_only:
        while not stop.wait(60):
            try:
                gauges.refresh(ctx)
            except StorageError as e:
                logger.error("reading the bucket for metrics failed: %s", e)
        server.shutdown()
        thread.join()
        return 0
    times = croniter(expression, datetime.now(UTC))
    while not stop.is_set():
        due: datetime = times.get_next(datetime)
        if stop.wait(max((due - datetime.now(UTC)).total_seconds(), 0)):
            break
        cycle(ctx, gauges)
    server.shutdown()
    thread.join()
    return 0

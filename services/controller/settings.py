"""Controller settings, read from ``FLEETPLANE_*`` environment variables at start."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.shared.settings import DatabaseSettings, KafkaSettings


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ControllerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FLEETPLANE_CONTROLLER_", frozen=True, extra="ignore"
    )

    instance_id: str = Field(default_factory=_default_instance_id)
    """Names this controller in the ownership table and in logs."""
    group_id: str = "fleetplane-controller"
    """Kafka consumer group: every controller of one deployment shares it."""
    web_host: str = "127.0.0.1"
    web_port: int = 18091
    """Liveness, readiness and metrics."""
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
    """The event loop the worker runs on. asyncio's own until uvloop measurably helps:
    side by side it did not (docs/decisions/0001-ownership.md, "Batch-wide SQL")."""
    batch_max_records: int = Field(default=500, ge=1, le=10_000)
    """Most records applied in one PostgreSQL transaction."""
    batch_within_s: float = Field(default=0.05, gt=0, le=5)
    """How long to wait for a batch to fill before applying what has arrived."""
    session_timeout_s: float = Field(default=3.0, ge=1, le=300)
    """Consumer-group session timeout: how long a silent controller keeps its partitions.

    The detection part of a kill -9 failover. Heartbeats come from faust's consumer
    thread, not the event loop that applies batches, so a busy controller keeps
    heartbeating; 3 s still leaves a loaded 2-core machine six heartbeats of slack
    before a false failover. The broker must allow it (``group.min.session.timeout.ms``,
    default 6 s; the native stack sets 1 s).
    """
    heartbeat_interval_s: float = Field(default=0.5, gt=0, le=60)
    """Also how soon the other members hear of a rebalance (the coordinator answers a
    heartbeat with REBALANCE_IN_PROGRESS), so it bounds the graceful handover too."""
    rebalance_timeout_s: float = Field(default=10.0, ge=1, le=300)
    """How long the coordinator waits for every live member to rejoin a rebalance.

    Nothing is applied anywhere while a rebalance waits, so faust's 60 s default
    would let one slow member stall the group for a minute; a member slower than
    this is dropped and rejoins with a rebalance of its own.
    """
    idle_in_transaction_timeout_s: float = Field(default=2.0, gt=0, le=300)
    """PostgreSQL ends a controller session idle inside a transaction this long.

    A paused controller (a "zombie") keeps its open apply transaction and the row
    locks of the effects written so far, which would hold the new owner back until
    the zombie wakes. Kept below ``session_timeout_s``: a pause long enough to lose
    the partitions has already lost the transaction, so a zombie never delays a
    failover. Our transactions run statement after statement, so a healthy
    controller is never idle this long; if it were, the batch is retried.
    """
    shutdown_drain_timeout_s: float = Field(default=10.0, gt=0, le=300)
    """On SIGTERM, how long the batch being applied may take to finish before the
    controller leaves the group anyway (the cut transaction rolls back)."""
    retry_max_backoff_s: float = Field(default=5.0, gt=0, le=60)
    """Cap on the pause between attempts while PostgreSQL is unavailable."""
    command_ack_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """How long an offered command may go without a result before it is offered again."""
    command_max_attempts: int = Field(default=5, ge=1, le=100)
    """Offers before a command without result is marked timed_out."""
    stall_warning_s: float = Field(default=60.0, gt=0, le=86_400)
    """A held partition whose oldest pending record is older than this is logged once as
    stalled, with its owner and offset (the gauge fleetplane_controller_oldest_pending_age_seconds
    shows it all along)."""
    command_timer_interval_s: float = Field(default=1.0, gt=0, le=60)
    startup_timeout_s: float = Field(default=60.0, gt=0)
    """How long to wait for Kafka and PostgreSQL at start before giving up."""
    data_dir: Path = Path(".run/controller")
    """faust's working folder (no tables are kept there)."""
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    # --- retention (docs/controller-ops.md) ---
    record_retention_s: float = Field(default=14 * 24 * 3600, gt=0)
    """How long event records (the deduplication keys) are kept after they were applied.

    Must be longer than the events topic's retention (Kafka's default: 7 days): a record
    still in Kafka can be read again (an offset reset, a replay), and once its key is
    pruned it would apply a second time. The controller refuses to start otherwise.
    """
    liveness_connected_s: float = Field(default=30.0, gt=0)
    """For the fleetplane_environments gauge: a heartbeat at most this old is ``connected``.
    Keep equal to the API's ``FLEETPLANE_API_LIVENESS_CONNECTED_S``, so the gauge and the
    operator API agree."""
    liveness_lost_s: float = Field(default=120.0, gt=0)
    """Older than ``liveness_connected_s`` but at most this old: ``unknown``; older: ``lost``
    (the API's ``FLEETPLANE_API_LIVENESS_LOST_S``)."""
    liveness_export_interval_s: float = Field(default=10.0, gt=0, le=3600)
    """How often each controller counts the environments of the customers it owns."""
    prune_interval_s: float = Field(default=60.0, gt=0, le=3600)
    """How often each controller prunes expired event records of the partitions it owns."""
    prune_chunk_rows: int = Field(default=5000, ge=1, le=100_000)
    """Most rows deleted per pruning transaction, so no prune holds locks for long."""

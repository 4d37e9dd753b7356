"""Controller settings, read from ``FLEETPLANE_*`` environment variables at start."""

from __future__ import annotations

import os
import socket
from pathlib import Path

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
    batch_max_records: int = Field(default=500, ge=1, le=10_000)
    """Most records applied in one PostgreSQL transaction."""
    batch_within_s: float = Field(default=0.05, gt=0, le=5)
    """How long to wait for a batch to fill before applying what has arrived."""
    session_timeout_s: float = Field(default=6.0, ge=1, le=300)
    """Consumer-group session timeout: how long a silent controller keeps its partitions."""
    heartbeat_interval_s: float = Field(default=1.0, gt=0, le=60)
    retry_max_backoff_s: float = Field(default=5.0, gt=0, le=60)
    """Cap on the pause between attempts while PostgreSQL is unavailable."""
    command_ack_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """How long an offered command may go without a result before it is offered again."""
    command_max_attempts: int = Field(default=5, ge=1, le=100)
    """Offers before a command without result is marked timed_out."""
    command_timer_interval_s: float = Field(default=1.0, gt=0, le=60)
    startup_timeout_s: float = Field(default=60.0, gt=0)
    """How long to wait for Kafka and PostgreSQL at start before giving up."""
    data_dir: Path = Path(".run/controller")
    """faust's working folder (no tables are kept there)."""
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)

"""Backup settings, read from ``FLEETPLANE_*`` environment variables when a verb starts."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class S3Settings(BaseSettings):
    """Where backups are kept: any S3-compatible server (the native stack runs Versity Gateway)."""

    model_config = SettingsConfigDict(env_prefix="FLEETPLANE_S3_", frozen=True, extra="ignore")

    endpoint: str | None = None
    """Base URL of the S3 API; when unset, the native stack's server on ``port``."""
    port: int = Field(default=18900, ge=1, le=65535)
    """The native stack's S3 port (infra/local/lib.sh), used when ``endpoint`` is unset."""
    bucket: str = "fleetplane-backups"
    region: str = "us-east-1"
    access_key: str = "fleetplane"
    secret_key: SecretStr = SecretStr("fleetplane-secret")
    prefix: str = "backups"
    """Key prefix of every backup object; one folder per database below it."""
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120)
    read_timeout_s: float = Field(default=30.0, gt=0, le=600)
    max_attempts: int = Field(default=4, ge=1, le=20)
    """botocore's standard retry mode: total attempts per request, with backoff."""
    part_size_mib: int = Field(default=8, ge=5, le=512)
    """Multipart part size; an upload holds at most 10 parts in memory."""
    max_concurrency: int = Field(default=4, ge=1, le=32)

    @property
    def url(self) -> str:
        return self.endpoint or f"http://127.0.0.1:{self.port}"


class BackupSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEETPLANE_BACKUP_", frozen=True, extra="ignore")

    pg_bin: Path = Path("/usr/lib/postgresql/15/bin")
    """pg_dump and pg_restore of the server's major version (a newer client writes
    settings an older server refuses)."""
    compress_level: int = Field(default=1, ge=0, le=9)
    """pg_dump's compression (before encryption); 1 is fast and shrinks most of it."""
    age_recipient: str | None = None
    """age public key (``age1…``) that backups are encrypted to. Only this is needed
    to take backups; restore and verify need the identity."""
    age_identity: SecretStr | None = None
    """age secret key (``AGE-SECRET-KEY-1…``), for restore and verify (and to derive
    the recipient when none is set)."""
    age_identity_file: Path | None = None
    """A file holding the age secret key, as ``age-keygen`` writes it."""
    keep_last: int = Field(default=7, ge=1, le=1000)
    """Retention: the newest N backups are kept."""
    keep_daily: int = Field(default=7, ge=0, le=1000)
    """Retention: the newest backup of each of the last N UTC days with a backup."""
    keep_weekly: int = Field(default=4, ge=0, le=1000)
    """Retention: the newest backup of each of the last N ISO weeks with a backup."""
    schedule: str = "0 * * * *"
    """Cron expression for ``schedule`` (backup, then verify and prune)."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=18990, ge=1, le=65535)
    work_dir: Path | None = None
    """Where restore keeps the downloaded object while checking its sha256 (the
    system's temporary folder when unset)."""

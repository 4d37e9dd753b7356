"""Settings fragments shared by the services.

Each service composes these into its own frozen settings object, read from
``FLEETPLANE_*`` environment variables when the service starts, never at import.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class _Fragment(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEETPLANE_", frozen=True, extra="ignore")


class PkiLocation(_Fragment):
    """Where the project's PKI files live; shared by every service (``FLEETPLANE_PKI_DIR``)."""

    pki_dir: Path = Path(".run/pki")
    """Folder holding certificates and keys made by the project's PKI scripts (never the
    root CA's key)."""


def with_pki_defaults(data: Any, files: Mapping[str, str]) -> Any:
    """Settings input with each path field of ``files`` left unset pointed into the PKI folder.

    For a ``model_validator(mode="before")``: ``files`` maps field names to file names
    inside ``FLEETPLANE_PKI_DIR``.
    """
    if not isinstance(data, dict):
        return data
    missing = [name for name in files if data.get(name) is None]
    if not missing:
        return data
    pki_dir = PkiLocation().pki_dir
    return {**data, **{name: pki_dir / files[name] for name in missing}}


class DatabaseSettings(_Fragment):
    database_host: str = "127.0.0.1"
    """PostgreSQL host."""
    database_port: int = 15432
    """PostgreSQL port (the native stack's default)."""
    database_name: str = "fleetplane"
    database_user: str = "fleetplane"
    database_password: SecretStr = SecretStr("fleetplane")
    database_pool_size: int = Field(default=10, ge=1, le=200)
    """Connections kept open per process."""

    def _url(self, driver: str) -> str:
        password = self.database_password.get_secret_value()
        return (
            f"postgresql+{driver}://{self.database_user}:{password}"
            f"@{self.database_host}:{self.database_port}/{self.database_name}"
        )

    @property
    def async_url(self) -> str:
        return self._url("psycopg_async")

    @property
    def sync_url(self) -> str:
        return self._url("psycopg")

    @property
    def libpq_dsn(self) -> str:
        """For plain psycopg connections (LISTEN/NOTIFY, tools)."""
        password = self.database_password.get_secret_value()
        return (
            f"host={self.database_host} port={self.database_port} dbname={self.database_name} "
            f"user={self.database_user} password={password}"
        )


class KafkaSettings(_Fragment):
    kafka_bootstrap: str = "127.0.0.1:19092"
    """Comma-separated host:port list of Kafka brokers."""
    events_topic: str = "fleetplane.events"
    """Agent events and operator changes, keyed by customer id."""
    dead_letter_topic: str = "fleetplane.events.dlq"
    """Records the controller could not decode or validate, with the reason."""
    topic_partitions: int = Field(default=12, ge=1, le=1024)
    """Partition count of the events topic: the most controllers that can work at once."""
    identity_topic: str = "fleetplane.identity"
    """The identity journal: every agent-identity change gateway_auth makes, written
    before its database commit, so a restore of an older backup can replay them
    (services/shared/identity_journal.py). Compacted, one partition."""

"""Settings of the API service, read from the environment when the service starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.shared.settings import DatabaseSettings, KafkaSettings, with_pki_defaults

MIB: Final = 1024 * 1024

# File names inside the PKI folder, used when a path is not set explicitly.
_PKI_FILES: Final = {
    "tls_cert": "api-server.pem",
    "tls_key": "api-server.key",
    "edge_ca": "internal-ca.pem",
}


class ApiSettings(BaseSettings):
    """Everything the API needs, frozen once built.

    Own fields come from ``FLEETPLANE_API_*``; ``database`` and ``kafka`` are the
    shared fragments (``FLEETPLANE_DATABASE_*``, ``FLEETPLANE_KAFKA_*`` ...). TLS
    paths left unset default to files in ``FLEETPLANE_PKI_DIR``.
    """

    model_config = SettingsConfigDict(env_prefix="FLEETPLANE_API_", frozen=True, extra="ignore")

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)

    host: str = "127.0.0.1"
    """Address to listen on; only the edge should be able to reach it."""
    port: int = Field(default=18081, ge=1, le=65535)
    tls_cert: Path
    """Server certificate chain (PEM); default ``<pki_dir>/api-server.pem``."""
    tls_key: Path
    """Private key of ``tls_cert``; default ``<pki_dir>/api-server.key``."""
    edge_ca: Path
    """CA that issued the edge's client certificate; default ``<pki_dir>/internal-ca.pem``.

    It must not be the CA that issues agent certificates, or an agent named like the
    edge could present its own certificate directly and forge identity headers.
    """
    edge_client_cn: str = "fleetplane-edge"
    """Subject CN of the edge's client certificate: the only peer whose identity headers count."""
    produce_timeout_s: float = Field(default=4.0, gt=0, le=4.5)
    """Longest wait for Kafka to acknowledge a batch; below 5 s so a 503 comes within 5 s."""
    producer_metadata_max_age_s: float = Field(default=10.0, gt=0, le=300)
    """How often the producer refreshes topic metadata, so the longest it keeps
    producing with an old partition count after partitions were added; the
    drain-then-add procedure keeps intake paused this long (docs/runbooks/partitions.md)."""
    producers: int = Field(default=2, ge=1, le=32)
    """Kafka producers per API process. A producer has one produce request in flight
    to a broker at a time, carrying at most one batch per partition, and each
    request's records are a batch of their own: several producers let concurrent
    requests to one partition travel in parallel instead of one per round trip.
    Each adds produce requests, which cost the API and the broker CPU: two was the
    better of 1, 2 and 4 in the accept benchmark (docs/performance.md)."""
    retry_after_s: int = Field(default=2, ge=1, le=3600)
    """``Retry-After`` sent with 503 answers."""
    startup_timeout_s: float = Field(default=60.0, gt=0)
    """How long ``python -m services.api`` waits for Kafka and PostgreSQL before giving up."""
    shutdown_timeout_s: float = Field(default=10.0, gt=0)
    """On SIGTERM, how long in-flight requests may take before they are cancelled."""
    max_body_bytes: int = Field(default=MIB, ge=1024, le=64 * MIB)
    """Largest request body accepted (413 beyond)."""
    liveness_connected_s: float = Field(default=30.0, gt=0)
    """An environment whose last heartbeat is at most this old is ``connected``."""
    liveness_lost_s: float = Field(default=120.0, gt=0)
    """Older than ``liveness_connected_s`` but at most this old: ``unknown``; older: ``lost``."""
    operator_key_cache_s: float = Field(default=5.0, ge=0, le=5)
    """How long a looked-up operator key is reused (0: look up every request).

    Also the longest a revoked key keeps working on an API instance that cached it.
    """

    identity_reload_s: float = Field(default=30.0, gt=0, le=3600)
    """Full reload of revocations (for open long polls), besides the reload on each NOTIFY."""

    @model_validator(mode="after")
    def _liveness_thresholds_in_order(self) -> ApiSettings:
        if self.liveness_lost_s <= self.liveness_connected_s:
            raise ValueError("liveness_lost_s must be above liveness_connected_s")
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_paths_from_pki_dir(cls, data: Any) -> Any:
        return with_pki_defaults(data, _PKI_FILES)

    @classmethod
    def load(cls) -> ApiSettings:
        """Read the environment now. Raises pydantic.ValidationError on bad values."""
        return cls()

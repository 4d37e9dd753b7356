"""Settings of the API service, read from the environment when the service starts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.shared.web.settings import HttpServiceSettings

MIB: Final = 1024 * 1024

# File names inside the PKI folder, used when a path is not set explicitly.
_PKI_FILES: Final = {
    "tls_cert": "api-server.pem",
    "tls_key": "api-server.key",
    "edge_ca": "internal-ca.pem",
}


class ApiSettings(HttpServiceSettings):
    """Everything the API needs, frozen once built.

    Own fields come from ``FLEETPLANE_API_*``; ``database`` and ``kafka`` are the
    shared fragments (``FLEETPLANE_DATABASE_*``, ``FLEETPLANE_KAFKA_*`` ...). The
    listener, TLS, start and stop fields are those of every HTTP service
    (``HttpServiceSettings``); TLS paths left unset default to files in
    ``FLEETPLANE_PKI_DIR``.
    """

    model_config = SettingsConfigDict(env_prefix="FLEETPLANE_API_", frozen=True, extra="ignore")

    pki_files: ClassVar[Mapping[str, str]] = _PKI_FILES

    port: int = Field(default=18081, ge=1, le=65535)
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

    @classmethod
    def load(cls) -> ApiSettings:
        """Read the environment now. Raises pydantic.ValidationError on bad values."""
        return cls()

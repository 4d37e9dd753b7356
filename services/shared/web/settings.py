"""Settings every HTTP service behind the edge has: listener, internal TLS, start and stop."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings

from services.shared.settings import DatabaseSettings, KafkaSettings, with_pki_defaults


class HttpServiceSettings(BaseSettings):
    """The fields the shared HTTP layer reads; each service subclasses it with its own
    ``env_prefix``, its ``port`` default and its ``pki_files``.

    TLS paths left unset default to files in ``FLEETPLANE_PKI_DIR`` (``pki_files``
    maps field names to file names there).
    """

    pki_files: ClassVar[Mapping[str, str]] = {}

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)

    host: str = "127.0.0.1"
    """Address to listen on; only the edge should be able to reach it."""
    port: int = Field(ge=1, le=65535)
    tls_cert: Path
    """Server certificate chain (PEM) of the edge->service hop (internal CA)."""
    tls_key: Path
    """Private key of ``tls_cert``."""
    edge_ca: Path
    """CA that issued the edge's client certificate (the internal CA).

    It must not be the CA that issues agent certificates, or an agent named like the
    edge could present its own certificate directly and forge identity headers.
    """
    edge_client_cn: str = "fleetplane-edge"
    """Subject CN of the edge's client certificate: the only peer whose identity headers count."""
    retry_after_s: int = Field(default=2, ge=1, le=3600)
    """``Retry-After`` sent with 503 answers."""
    startup_timeout_s: float = Field(default=60.0, gt=0)
    """How long ``python -m`` waits for its dependencies (Kafka, PostgreSQL) before giving up."""
    shutdown_timeout_s: float = Field(default=10.0, gt=0)
    """On SIGTERM, how long in-flight requests may take before they are cancelled."""

    @model_validator(mode="before")
    @classmethod
    def _default_paths_from_pki_dir(cls, data: Any) -> Any:
        return with_pki_defaults(data, cls.pki_files)

"""Settings of the gateway_auth service, read from the environment when it starts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Final

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.shared.settings import KafkaSettings
from services.shared.web.settings import HttpServiceSettings

# File names inside FLEETPLANE_PKI_DIR, used when a path is not set explicitly.
_PKI_FILES: Final = {
    # The internal hop's server certificate: the same internal CA and names as the API's.
    "tls_cert": "api-server.pem",
    "tls_key": "api-server.key",
    "edge_ca": "internal-ca.pem",
    "issuing_ca_cert": "issuing-ca.pem",
    "issuing_ca_key": "issuing-ca.key",
    "edge_server_cert": "edge-server.pem",
    "root_ca_cert": "root-ca.pem",
}


class GatewayAuthSettings(HttpServiceSettings):
    """Everything gateway_auth needs, frozen once built (``FLEETPLANE_GATEWAY_AUTH_*``).

    The listener, TLS, start and stop fields are those of every HTTP service
    (``HttpServiceSettings``); TLS and CA paths left unset default to files in
    ``FLEETPLANE_PKI_DIR``.
    """

    model_config = SettingsConfigDict(
        env_prefix="FLEETPLANE_GATEWAY_AUTH_", frozen=True, extra="ignore"
    )

    pki_files: ClassVar[Mapping[str, str]] = _PKI_FILES

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    """Only the identity journal's topic is used (services/shared/identity_journal.py)."""
    port: int = Field(default=18083, ge=1, le=65535)
    issuing_ca_cert: Path
    """The issuing CA that signs agent certificates; re-read when the file changes."""
    issuing_ca_key: Path
    edge_server_cert: Path
    """The edge's server certificate; only its expiry is read (exported as a metric)."""
    root_ca_cert: Path
    """The root CA's certificate; only its expiry is read (exported as a metric)."""
    agent_validity_s: int = Field(default=24 * 3600, ge=60, le=7 * 24 * 3600)
    """Lifetime of issued agent certificates (default 24 h)."""
    token_ttl_s: int = Field(default=15 * 60, ge=30, le=24 * 3600)
    """Default lifetime of an enrollment token."""
    token_ttl_max_s: int = Field(default=24 * 3600, ge=30, le=7 * 24 * 3600)
    """Longest lifetime an operator may ask for."""
    trust_reload_s: float = Field(default=30.0, gt=0, le=3600)
    """Full reload of revocations and issuing CAs, besides the reload on each NOTIFY."""

    @classmethod
    def load(cls) -> GatewayAuthSettings:
        """Read the environment now. Raises pydantic.ValidationError on bad values."""
        return cls()

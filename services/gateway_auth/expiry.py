"""Expiry of the platform's own certificates, exported for the certificate-expiry alert.

gateway_auth reads the PKI folder anyway (it signs with the issuing CA); the files
are re-read at each scrape, so a renewed certificate shows at once. A missing or
unreadable file drops its series rather than failing the scrape: the alert is
about dates, and a missing file fails the services that need it loudly enough.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from prometheus_client import Gauge

log = logging.getLogger(__name__)


def not_after(path: Path) -> float | None:
    """The first certificate's notAfter in a PEM file, as Unix time; None if unreadable."""
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        # Debug only: scraped every few seconds, and a missing file fails the services
        # that need it loudly enough.
        log.debug("certificate expiry: cannot read %s: %s", path, e)
        return None
    return certificate.not_valid_after_utc.timestamp()


def refresh(gauge: Gauge, certificates: Mapping[str, Path]) -> None:
    """Set ``gauge{certificate=name}`` for each file; remove the series of unreadable ones."""
    for name, path in certificates.items():
        expires = not_after(path)
        if expires is None:
            # KeyError: never exported, nothing to remove.
            with contextlib.suppress(KeyError):
                gauge.remove(name)
        else:
            gauge.labels(name).set(expires)

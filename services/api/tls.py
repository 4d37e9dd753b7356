"""The API's TLS server context."""

from __future__ import annotations

import ssl

from services.api.settings import ApiSettings


def server_ssl_context(settings: ApiSettings) -> ssl.SSLContext:
    """A TLS server context that asks for, but does not require, a client certificate.

    A certificate that is presented must chain to ``settings.edge_ca`` or the
    handshake fails; without one the connection proceeds and the request carries
    no trusted identity (health checks, metrics). Raises OSError / ssl.SSLError
    when a file is missing or unreadable.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    context.load_verify_locations(cafile=settings.edge_ca)
    context.verify_mode = ssl.CERT_OPTIONAL
    return context

"""The internal hop's TLS: the server context and the peer's certificate."""

from __future__ import annotations

import ssl
from pathlib import Path

from aiohttp import web

from services.shared.edge_auth import PeerCert


def server_ssl_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """A TLS server context that asks for, but does not require, a client certificate.

    A certificate that is presented must chain to ``client_ca`` (the internal CA
    of the edge's client certificate) or the handshake fails; without one the
    connection proceeds and the request carries no trusted identity (health
    checks, metrics); every route that matters checks that the peer is the edge.
    Raises OSError / ssl.SSLError when a file is missing or unreadable.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=client_ca)
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def peer_cert(request: web.Request) -> PeerCert | None:
    """The verified client certificate of the request's TLS connection, if one was presented."""
    transport = request.transport
    peer: PeerCert | None = transport.get_extra_info("peercert") if transport is not None else None
    return peer

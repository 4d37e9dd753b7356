"""Who is calling: agents and operators, as the edge presents them, trusted only from the edge.

The API's TLS layer asks every client for a certificate (CERT_OPTIONAL) and
verifies any it gets against the internal CA. nginx presents the edge client
certificate on every hop and has two listeners, which it names in
``X-Fleetplane-Listener`` (always overwritten):

- ``agent``: agents over mTLS; nginx forwards the agent's verified subject DN in
  ``X-Fleetplane-Client-*`` headers it always overwrites.
- ``operator``: server TLS only; nginx forwards no client headers and operators
  authenticate with an API key (``Authorization: Bearer fpk_...``).

Anyone but the edge who sends the listener or client headers is forging them.
A route serves one listener only, so an agent certificate can never reach an
operator route and an operator key never reaches an agent route, even if nginx's
own path rules were wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from services.shared.identity import AgentIdentity, IdentityError
from services.shared.operator_keys import MalformedKeyError, parse_token
from services.shared.problems import Forbidden, OperatorUnauthenticated, Unauthenticated

HEADER_PREFIX: Final = "x-fleetplane-client-"
DN_HEADER: Final = "X-Fleetplane-Client-DN"
VERIFY_HEADER: Final = "X-Fleetplane-Client-Verify"
SERIAL_HEADER: Final = "X-Fleetplane-Client-Serial"
ISSUER_HEADER: Final = "X-Fleetplane-Client-Issuer-DN"
CERT_HEADER: Final = "X-Fleetplane-Client-Cert"
"""The verified certificate, URL-encoded PEM (``$ssl_client_escaped_cert``): sent by
the edge to gateway_auth's per-request check only."""
LISTENER_HEADER: Final = "X-Fleetplane-Listener"
AUTHORIZATION_HEADER: Final = "Authorization"

Listener = Literal["agent", "operator"]
AGENT_LISTENER: Final[Listener] = "agent"
OPERATOR_LISTENER: Final[Listener] = "operator"

PeerCert = Mapping[str, Any]
"""What ``ssl.SSLSocket.getpeercert()`` returns for a verified certificate."""


def peer_common_names(peer_cert: PeerCert | None) -> list[str]:
    """Every CN in the subject of an already verified peer certificate (none without one)."""
    if not peer_cert:
        return []
    names: list[str] = []
    for rdn in peer_cert.get("subject", ()):
        for attribute, value in rdn:
            if attribute == "commonName":
                names.append(value)
    return names


def is_edge(peer_cert: PeerCert | None, edge_cn: str) -> bool:
    """True when the TLS peer is the edge: its one subject CN is ``edge_cn``.

    Only meaningful for a certificate the ssl layer verified against the edge CA.
    """
    return peer_common_names(peer_cert) == [edge_cn]


@dataclass(frozen=True, slots=True)
class _EdgeHeaders:
    """The request headers the listener rule looks at, lower-cased names, repeats kept."""

    client: dict[str, list[str]]
    listener: list[str]
    authorization: list[str]


def _edge_headers(
    headers: Iterable[tuple[str, str]],
    peer_cert: PeerCert | None,
    *,
    edge_cn: str,
    listener: Listener,
    not_from_edge: str,
) -> _EdgeHeaders:
    """The checks both kinds of route share: edge-only headers, then the route's listener.

    Raises Forbidden when client or listener headers come from any peer but the
    edge, or when the edge names another listener than ``listener`` (or none, or
    several); Unauthenticated(``not_from_edge``) when the peer is not the edge.
    """
    found = _EdgeHeaders({}, [], [])
    listener_name = LISTENER_HEADER.lower()
    authorization_name = AUTHORIZATION_HEADER.lower()
    for name, value in headers:
        lowered = name.lower()
        if lowered.startswith(HEADER_PREFIX):
            found.client.setdefault(lowered, []).append(value)
        elif lowered == listener_name:
            found.listener.append(value)
        elif lowered == authorization_name:
            found.authorization.append(value)
    from_edge = is_edge(peer_cert, edge_cn)
    if (found.client or found.listener) and not from_edge:
        raise Forbidden("identity headers are accepted only from the edge")
    if not from_edge:
        if listener == OPERATOR_LISTENER:
            raise OperatorUnauthenticated(not_from_edge)
        raise Unauthenticated(not_from_edge)
    if found.listener != [listener]:
        raise Forbidden(f"this route is served only on the edge's {listener} listener")
    return found


@dataclass(frozen=True, slots=True)
class AgentCertificate:
    """The verified agent certificate as the edge forwarded it."""

    identity: AgentIdentity
    serial: str | None
    """Hex serial number (``$ssl_client_serial``), when the edge forwarded exactly one."""
    issuer_dn: str | None
    """Issuer DN (``$ssl_client_i_dn``), when the edge forwarded exactly one."""
    escaped_pem: str | None = None
    """The certificate itself (``CERT_HEADER``), when the edge forwarded exactly one."""


def identity_from_request(
    headers: Iterable[tuple[str, str]], peer_cert: PeerCert | None, *, edge_cn: str
) -> AgentIdentity:
    """The calling agent's identity, from the edge's headers only.

    ``headers`` are all request header (name, value) pairs, repeated names
    included (pass ``request.headers.items()``); ``peer_cert`` is the verified
    TLS peer certificate or None. Raises Forbidden when identity or listener
    headers come from any peer but the edge, or when the edge did not receive the
    request on its agent listener; Unauthenticated when there is no usable
    edge-verified identity (not the edge, none forwarded, verification not
    SUCCESS, repeated or malformed DN).
    """
    return agent_certificate_from_request(headers, peer_cert, edge_cn=edge_cn).identity


def agent_certificate_from_request(
    headers: Iterable[tuple[str, str]], peer_cert: PeerCert | None, *, edge_cn: str
) -> AgentCertificate:
    """``identity_from_request`` with the certificate's serial and issuer; same errors."""
    forwarded = _edge_headers(
        headers,
        peer_cert,
        edge_cn=edge_cn,
        listener=AGENT_LISTENER,
        not_from_edge=(
            "agent requests must come through the edge with a verified client certificate"
        ),
    ).client
    verify = forwarded.get(VERIFY_HEADER.lower(), [])
    if verify != ["SUCCESS"]:
        raise Unauthenticated("the edge did not verify a client certificate for this request")
    dns = forwarded.get(DN_HEADER.lower(), [])
    if len(dns) != 1:
        raise Unauthenticated("the edge forwarded no single client subject DN")
    try:
        identity = AgentIdentity.from_subject_dn(dns[0])
    except IdentityError as e:
        raise Unauthenticated(
            "the client certificate's subject is not an agent identity "
            "(expected CN=<agent>,OU=<environment>,O=<customer>)"
        ) from e
    serials = forwarded.get(SERIAL_HEADER.lower(), [])
    issuers = forwarded.get(ISSUER_HEADER.lower(), [])
    certificates = forwarded.get(CERT_HEADER.lower(), [])
    return AgentCertificate(
        identity,
        serials[0] if len(serials) == 1 and serials[0] else None,
        issuers[0] if len(issuers) == 1 and issuers[0] else None,
        certificates[0] if len(certificates) == 1 and certificates[0] else None,
    )


@dataclass(frozen=True, slots=True)
class OperatorCredentials:
    """An operator key as presented: not yet checked against the stored keys."""

    key_id: str
    secret: str = field(repr=False)


def operator_credentials_from_request(
    headers: Iterable[tuple[str, str]], peer_cert: PeerCert | None, *, edge_cn: str
) -> OperatorCredentials:
    """The operator key a request presents, once the listener rule allows it.

    Same arguments as ``identity_from_request``. Raises Forbidden when listener or
    client headers come from any peer but the edge, when the edge did not receive
    the request on its operator listener (an agent certificate never reaches an
    operator route), or when the request carries ``X-Fleetplane-Client-*``
    headers (the operator listener never forwards them, so they are forged or
    misrouted); OperatorUnauthenticated (401) when the peer is not the edge or
    there is no single well-formed ``Authorization: Bearer fpk_...`` header. No
    error repeats the presented token.
    """
    found = _edge_headers(
        headers,
        peer_cert,
        edge_cn=edge_cn,
        listener=OPERATOR_LISTENER,
        not_from_edge="operator requests must come through the edge's operator listener",
    )
    if found.client:
        raise Forbidden("operator requests must not carry client certificate headers")
    if len(found.authorization) != 1:
        raise OperatorUnauthenticated("send one Authorization header: Bearer fpk_<key id>_<secret>")
    scheme, _, token = found.authorization[0].strip().partition(" ")
    # RFC 9110: the scheme name is case-insensitive.
    if scheme.lower() != "bearer":
        raise OperatorUnauthenticated("the Authorization scheme must be Bearer")
    try:
        key_id, secret = parse_token(token.strip())
    except MalformedKeyError as e:
        raise OperatorUnauthenticated(str(e)) from None
    return OperatorCredentials(key_id, secret)

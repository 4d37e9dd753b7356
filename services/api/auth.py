"""Who is calling: the agent identity the edge verified, trusted only from the edge.

The API's TLS layer asks every client for a certificate (CERT_OPTIONAL) and
verifies any it gets against the internal CA. nginx presents the edge client
certificate and forwards the agent's verified subject DN in headers it always
overwrites. Anyone else who sends those headers is forging them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from services.api.problems import Forbidden, Unauthenticated
from services.shared.identity import AgentIdentity, IdentityError

HEADER_PREFIX: Final = "x-fleetplane-client-"
DN_HEADER: Final = "X-Fleetplane-Client-DN"
VERIFY_HEADER: Final = "X-Fleetplane-Client-Verify"
SERIAL_HEADER: Final = "X-Fleetplane-Client-Serial"

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


def identity_from_request(
    headers: Iterable[tuple[str, str]], peer_cert: PeerCert | None, *, edge_cn: str
) -> AgentIdentity:
    """The calling agent's identity, from the edge's headers only.

    ``headers`` are all request header (name, value) pairs, repeated names
    included (pass ``request.headers.items()``); ``peer_cert`` is the verified
    TLS peer certificate or None. Raises Forbidden when identity headers come from
    any peer but the edge, Unauthenticated when there is no usable edge-verified
    identity (none forwarded, verification not SUCCESS, repeated or malformed DN).
    """
    forwarded: dict[str, list[str]] = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered.startswith(HEADER_PREFIX):
            forwarded.setdefault(lowered, []).append(value)
    from_edge = is_edge(peer_cert, edge_cn)
    if forwarded and not from_edge:
        raise Forbidden("identity headers are accepted only from the edge")
    if not from_edge:
        raise Unauthenticated(
            "agent requests must come through the edge with a verified client certificate"
        )
    verify = forwarded.get(VERIFY_HEADER.lower(), [])
    if verify != ["SUCCESS"]:
        raise Unauthenticated("the edge did not verify a client certificate for this request")
    dns = forwarded.get(DN_HEADER.lower(), [])
    if len(dns) != 1:
        raise Unauthenticated("the edge forwarded no single client subject DN")
    try:
        return AgentIdentity.from_subject_dn(dns[0])
    except IdentityError as e:
        raise Unauthenticated(
            "the client certificate's subject is not an agent identity "
            "(expected CN=<agent>,OU=<environment>,O=<customer>)"
        ) from e

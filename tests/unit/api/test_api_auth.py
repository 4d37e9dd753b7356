"""Invariant 1 at the API: identity headers count only from the edge's TLS connection."""

from __future__ import annotations

import pytest

from services.api.auth import identity_from_request, is_edge, peer_common_names
from services.api.problems import Forbidden, Unauthenticated
from services.shared.identity import AgentIdentity

EDGE = "fleetplane-edge"
EDGE_CERT = {"subject": ((("organizationName", "Fleetplane"),), (("commonName", EDGE),))}
OTHER_CERT = {"subject": ((("commonName", "fleetplane-controller"),),)}
GOOD = [
    ("X-Fleetplane-Client-DN", "CN=agent-1,OU=prod,O=acme"),
    ("X-Fleetplane-Client-Verify", "SUCCESS"),
    ("X-Fleetplane-Client-Serial", "0A1B"),
    ("Content-Type", "application/json"),
]


def test_edge_with_verified_dn_gives_identity() -> None:
    identity = identity_from_request(GOOD, EDGE_CERT, edge_cn=EDGE)
    assert identity == AgentIdentity("acme", "prod", "agent-1")


@pytest.mark.parametrize("peer", [None, {}, OTHER_CERT], ids=["plain", "no-cert", "other-cn"])
def test_identity_headers_from_anyone_but_the_edge_are_forbidden(
    peer: dict[str, object] | None,
) -> None:
    with pytest.raises(Forbidden, match="only from the edge"):
        identity_from_request(GOOD, peer, edge_cn=EDGE)


@pytest.mark.parametrize(
    "header", ["x-fleetplane-client-dn", "X-FLEETPLANE-CLIENT-VERIFY", "X-Fleetplane-Client-Foo"]
)
def test_any_single_identity_header_from_a_non_edge_peer_is_forbidden(header: str) -> None:
    with pytest.raises(Forbidden):
        identity_from_request([(header, "x")], None, edge_cn=EDGE)


@pytest.mark.parametrize("peer", [None, OTHER_CERT, EDGE_CERT])
def test_no_forwarded_identity_is_unauthenticated(peer: dict[str, object] | None) -> None:
    with pytest.raises(Unauthenticated):
        identity_from_request([("Accept", "*/*")], peer, edge_cn=EDGE)


@pytest.mark.parametrize("verify", ["NONE", "FAILED:certificate has expired", "success", ""])
def test_verify_other_than_success_is_unauthenticated(verify: str) -> None:
    headers = [(k, verify if k.endswith("Verify") else v) for k, v in GOOD]
    with pytest.raises(Unauthenticated, match="did not verify"):
        identity_from_request(headers, EDGE_CERT, edge_cn=EDGE)


def test_missing_dn_is_unauthenticated() -> None:
    headers = [(k, v) for k, v in GOOD if not k.endswith("DN")]
    with pytest.raises(Unauthenticated):
        identity_from_request(headers, EDGE_CERT, edge_cn=EDGE)


def test_repeated_dn_header_is_unauthenticated() -> None:
    headers = [*GOOD, ("X-Fleetplane-Client-DN", "CN=agent-2,OU=prod,O=other")]
    with pytest.raises(Unauthenticated):
        identity_from_request(headers, EDGE_CERT, edge_cn=EDGE)


@pytest.mark.parametrize(
    "dn",
    [
        "",
        "CN=agent-1,OU=prod",
        "CN=agent-1,OU=prod,O=acme,O=other",
        "CN=agent-1,OU=prod,O=acme,L=Paris",
        "CN=Agent_1,OU=prod,O=acme",
        "CN=agent-1+OU=x,OU=prod,O=acme",
        "garbage",
    ],
)
def test_malformed_dn_is_unauthenticated(dn: str) -> None:
    headers = [(k, dn if k.endswith("DN") else v) for k, v in GOOD]
    with pytest.raises(Unauthenticated, match="not an agent identity"):
        identity_from_request(headers, EDGE_CERT, edge_cn=EDGE)


def test_edge_is_recognised_by_its_single_common_name_only() -> None:
    assert is_edge(EDGE_CERT, EDGE)
    assert not is_edge(OTHER_CERT, EDGE)
    assert not is_edge(None, EDGE)
    two_cns = {"subject": ((("commonName", EDGE),), (("commonName", "x"),))}
    assert not is_edge(two_cns, EDGE)
    assert peer_common_names(two_cns) == [EDGE, "x"]
    assert not is_edge({"subject": ((("organizationName", EDGE),),)}, EDGE)

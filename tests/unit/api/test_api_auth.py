"""Invariant 1 at the API: identity headers count only from the edge's TLS connection, and
each route only from the edge listener it belongs to."""

from __future__ import annotations

import pytest

from services.shared.edge_auth import (
    OperatorCredentials,
    identity_from_request,
    is_edge,
    operator_credentials_from_request,
    peer_common_names,
)
from services.shared.identity import AgentIdentity
from services.shared.operator_keys import new_key
from services.shared.problems import Forbidden, OperatorUnauthenticated, Unauthenticated

EDGE = "fleetplane-edge"
EDGE_CERT = {"subject": ((("organizationName", "Fleetplane"),), (("commonName", EDGE),))}
OTHER_CERT = {"subject": ((("commonName", "fleetplane-controller"),),)}
AGENT_LISTENER = ("X-Fleetplane-Listener", "agent")
OPERATOR_LISTENER = ("X-Fleetplane-Listener", "operator")
GOOD = [
    AGENT_LISTENER,
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
    "header",
    [
        "x-fleetplane-client-dn",
        "X-FLEETPLANE-CLIENT-VERIFY",
        "X-Fleetplane-Client-Foo",
        "x-fleetplane-listener",
    ],
)
def test_any_single_identity_header_from_a_non_edge_peer_is_forbidden(header: str) -> None:
    with pytest.raises(Forbidden, match="only from the edge"):
        identity_from_request([(header, "agent")], None, edge_cn=EDGE)
    with pytest.raises(Forbidden, match="only from the edge"):
        operator_credentials_from_request([(header, "operator")], OTHER_CERT, edge_cn=EDGE)


@pytest.mark.parametrize("peer", [None, OTHER_CERT])
def test_nothing_from_a_non_edge_peer_is_unauthenticated(peer: dict[str, object] | None) -> None:
    with pytest.raises(Unauthenticated, match="through the edge"):
        identity_from_request([("Accept", "*/*")], peer, edge_cn=EDGE)
    with pytest.raises(OperatorUnauthenticated, match="through the edge"):
        operator_credentials_from_request([("Accept", "*/*")], peer, edge_cn=EDGE)


def test_no_forwarded_identity_on_the_agent_listener_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated):
        identity_from_request([AGENT_LISTENER, ("Accept", "*/*")], EDGE_CERT, edge_cn=EDGE)


# --- the listener rule ---------------------------------------------------------


@pytest.mark.parametrize(
    "listeners",
    [[], [OPERATOR_LISTENER], [AGENT_LISTENER, AGENT_LISTENER], [("X-Fleetplane-Listener", "")]],
    ids=["none", "operator", "repeated", "empty"],
)
def test_agent_routes_need_the_agent_listener(listeners: list[tuple[str, str]]) -> None:
    headers = [*listeners, *(h for h in GOOD if h != AGENT_LISTENER)]
    with pytest.raises(Forbidden, match="agent listener"):
        identity_from_request(headers, EDGE_CERT, edge_cn=EDGE)


def _bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


def test_operator_credentials_from_the_operator_listener() -> None:
    key = new_key()
    credentials = operator_credentials_from_request(
        [OPERATOR_LISTENER, _bearer(key.token)], EDGE_CERT, edge_cn=EDGE
    )
    assert credentials == OperatorCredentials(key.key_id, key.token.split("_", 2)[2])
    assert key.token.split("_", 2)[2] not in repr(credentials)
    lower_scheme = ("authorization", f"bearer {key.token}")
    assert (
        operator_credentials_from_request(
            [OPERATOR_LISTENER, lower_scheme], EDGE_CERT, edge_cn=EDGE
        )
        == credentials
    )


def test_an_agent_certificate_never_reaches_operator_routes() -> None:
    # What the agent listener forwards, plus a valid key: still refused.
    headers = [*GOOD, _bearer(new_key().token)]
    with pytest.raises(Forbidden, match="operator listener"):
        operator_credentials_from_request(headers, EDGE_CERT, edge_cn=EDGE)
    without_listener = [h for h in headers if h != AGENT_LISTENER]
    with pytest.raises(Forbidden, match="operator listener"):
        operator_credentials_from_request(without_listener, EDGE_CERT, edge_cn=EDGE)


@pytest.mark.parametrize(
    "header", ["X-Fleetplane-Client-DN", "X-Fleetplane-Client-Verify", "x-fleetplane-client-x"]
)
def test_operator_requests_with_client_headers_are_forbidden(header: str) -> None:
    headers = [OPERATOR_LISTENER, (header, "CN=agent-1,OU=prod,O=acme"), _bearer(new_key().token)]
    with pytest.raises(Forbidden, match="client certificate headers"):
        operator_credentials_from_request(headers, EDGE_CERT, edge_cn=EDGE)


@pytest.mark.parametrize(
    "authorization",
    [
        [],
        [("Authorization", "Basic dXNlcjpwYXNz")],
        [("Authorization", "Bearer")],
        [("Authorization", "Bearer fpk_123_short")],
        [("Authorization", "Bearer fpk_0123456789ab_" + "x" * 42 + "!")],
        [_bearer(new_key().token), _bearer(new_key().token)],
    ],
    ids=["missing", "basic", "empty", "malformed", "bad-character", "repeated"],
)
def test_missing_or_malformed_operator_key_is_401_without_echo(
    authorization: list[tuple[str, str]],
) -> None:
    with pytest.raises(OperatorUnauthenticated) as caught:
        operator_credentials_from_request(
            [OPERATOR_LISTENER, *authorization], EDGE_CERT, edge_cn=EDGE
        )
    assert caught.value.status == 401
    assert caught.value.headers["WWW-Authenticate"].startswith("Bearer")
    for _, value in authorization:
        assert value.split(" ")[-1] not in caught.value.detail


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

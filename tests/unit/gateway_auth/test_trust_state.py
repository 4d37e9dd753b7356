"""Which certificates a trust state refuses: revocation scopes, issue times, issuers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.shared.identity import AgentIdentity
from services.shared.revocations import (
    RETIRED_ISSUER,
    REVOKED,
    UNKNOWN_ISSUER,
    Revocation,
    TrustState,
    normal_serial,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ISSUER = "CN=Issuing,O=Fleetplane Dev"
AGENT_1 = AgentIdentity("acme", "prod", "agent-1")
AGENT_2 = AgentIdentity("acme", "prod", "agent-2")
OTHER_ENV = AgentIdentity("acme", "staging", "agent-1")


def state(*revocations: Revocation, issued: dict[str, datetime] | None = None) -> TrustState:
    by_scope: dict[tuple[str, str], list[Revocation]] = {}
    for revocation in revocations:
        by_scope.setdefault((revocation.customer_id, revocation.environment_id), []).append(
            revocation
        )
    return TrustState(by_scope, issued or {}, {ISSUER: None, "CN=Old": T0 + timedelta(hours=1)})


def refused(s: TrustState, identity: AgentIdentity, serial: str, at: datetime = T0) -> str | None:
    found = s.refusal(identity, serial, ISSUER, at)
    return None if found is None else found[0]


def test_nothing_revoked_passes() -> None:
    assert refused(state(), AGENT_1, "ab") is None


def test_an_agent_revocation_covers_that_agent_only() -> None:
    s = state(Revocation("acme", "prod", "agent-1", T0))
    assert refused(s, AGENT_1, "ab") == REVOKED
    assert refused(s, AGENT_2, "cd") is None
    assert refused(s, OTHER_ENV, "ef") is None


def test_an_environment_revocation_covers_every_agent_of_it() -> None:
    s = state(Revocation("acme", "prod", None, T0))
    assert refused(s, AGENT_1, "ab") == REVOKED
    assert refused(s, AGENT_2, "cd") == REVOKED
    assert refused(s, OTHER_ENV, "ef") is None


def test_a_certificate_issued_after_the_revocation_passes() -> None:
    s = state(
        Revocation("acme", "prod", None, T0),
        issued={"before": T0 - timedelta(seconds=1), "after": T0 + timedelta(seconds=1)},
    )
    assert refused(s, AGENT_1, "before") == REVOKED
    assert refused(s, AGENT_1, "after") is None
    # An unrecorded certificate (made offline) is covered by identity alone.
    assert refused(s, AGENT_1, "unknown") == REVOKED


def test_issuers_unknown_or_past_their_window_are_refused() -> None:
    s = state()
    assert s.refusal(AGENT_1, "ab", "CN=Nobody", T0) == (UNKNOWN_ISSUER, None)
    assert s.refusal(AGENT_1, "ab", "CN=Old", T0) is None
    assert s.refusal(AGENT_1, "ab", "CN=Old", T0 + timedelta(hours=2)) == (RETIRED_ISSUER, None)


def test_serials_are_normalised_like_nginx_prints_them() -> None:
    assert normal_serial("00AB12") == "ab12" == normal_serial(0xAB12)

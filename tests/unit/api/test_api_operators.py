"""Operator keys (verification, cache, scope) and liveness derived at read time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.api.operators import environment_views, liveness
from services.api.repository import EnvironmentRow
from services.shared.edge_auth import OperatorCredentials
from services.shared.operator_auth import OperatorAuthenticator, OperatorKey, StoredOperatorKey
from services.shared.operator_keys import NewKey, new_key
from services.shared.problems import NotFound, OperatorUnauthenticated

from .conftest import FakeRepository

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def credentials(key: NewKey) -> OperatorCredentials:
    return OperatorCredentials(key.key_id, key.token.split("_", 2)[2])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- liveness ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age_s", "expected"),
    [
        (-5.0, "connected"),  # another instance's clock slightly ahead
        (0.0, "connected"),
        (30.0, "connected"),
        (30.001, "unknown"),
        (120.0, "unknown"),
        (120.001, "lost"),
        (86_400.0, "lost"),
    ],
)
def test_liveness_boundaries(age_s: float, expected: str) -> None:
    last = NOW - timedelta(seconds=age_s)
    assert liveness(last, NOW, connected_s=30, lost_s=120) == expected


def test_never_seen_without_a_heartbeat() -> None:
    assert liveness(None, NOW, connected_s=30, lost_s=120) == "never_seen"


def test_liveness_compares_instants_across_time_zones() -> None:
    plus_two = NOW.astimezone(datetime.fromisoformat("2026-01-01T00:00:00+02:00").tzinfo)
    assert liveness(plus_two - timedelta(seconds=31), NOW, connected_s=30, lost_s=120) == (
        "unknown"
    )


def test_environment_views_sorted_with_liveness() -> None:
    rows = [
        EnvironmentRow("prod", NOW - timedelta(seconds=200), "1.2.3", "ok", 3, 2, 1, 4),
        EnvironmentRow("dev", None, None, None, 0, 0, 0, 0),
        EnvironmentRow("edge", NOW - timedelta(seconds=5), "1.2.4", "degraded", 1, 1, 0, 1),
    ]
    views = environment_views(rows, NOW, connected_s=30, lost_s=120)
    assert [(v.environment_id, v.liveness) for v in views] == [
        ("dev", "never_seen"),
        ("edge", "connected"),
        ("prod", "lost"),
    ]
    assert views[2].model_dump(mode="json") == {
        "environment_id": "prod",
        "liveness": "lost",
        "last_heartbeat_at": "2026-03-01T11:56:40+00:00",
        "agent_version": "1.2.3",
        "health": "ok",
        "desired_revision": 3,
        "observed_revision": 2,
        "pending_commands": 1,
        "agents": 4,
    }


# --- scope ------------------------------------------------------------------------


def test_scope() -> None:
    everyone = OperatorKey("0123456789ab", None)
    acme = OperatorKey("0123456789ac", "acme")
    assert everyone.may_act_on("acme")
    assert everyone.may_act_on("other")
    assert acme.may_act_on("acme")
    assert not acme.may_act_on("other")
    acme.require_customer("acme")
    with pytest.raises(NotFound) as caught:
        acme.require_customer("other")
    # The answer does not depend on whether "other" exists, and does not name it.
    assert caught.value.status == 404
    assert "other" not in caught.value.detail


# --- authentication ---------------------------------------------------------------


async def test_valid_key_is_verified_with_its_scope() -> None:
    repository = FakeRepository()
    scoped, unscoped = repository.add_key("acme"), repository.add_key(None)
    authenticator = OperatorAuthenticator(repository, cache_s=0)
    assert await authenticator.authenticate(credentials(scoped)) == OperatorKey(
        scoped.key_id, "acme"
    )
    assert await authenticator.authenticate(credentials(unscoped)) == OperatorKey(
        unscoped.key_id, None
    )


async def test_unknown_revoked_or_wrong_keys_are_401() -> None:
    repository = FakeRepository()
    key = repository.add_key("acme")
    authenticator = OperatorAuthenticator(repository, cache_s=0)
    wrong_secret = OperatorCredentials(key.key_id, credentials(new_key()).secret)
    for presented in (credentials(new_key()), wrong_secret):
        with pytest.raises(OperatorUnauthenticated) as caught:
            await authenticator.authenticate(presented)
        assert caught.value.status == 401
        assert presented.secret not in caught.value.detail
    del repository.keys[key.key_id]  # revoked: the store no longer returns it
    with pytest.raises(OperatorUnauthenticated):
        await authenticator.authenticate(credentials(key))


async def test_cache_reuses_a_key_briefly_and_still_checks_the_secret() -> None:
    repository = FakeRepository()
    key = repository.add_key("acme")
    clock = Clock()
    authenticator = OperatorAuthenticator(repository, cache_s=5, clock=clock)
    await authenticator.authenticate(credentials(key))
    clock.now += 4.9
    await authenticator.authenticate(credentials(key))
    assert repository.key_lookups == [key.key_id]
    with pytest.raises(OperatorUnauthenticated):
        await authenticator.authenticate(OperatorCredentials(key.key_id, "x" * 43))

    # Revoked: refused once the cached entry is older than cache_s.
    del repository.keys[key.key_id]
    clock.now += 0.1
    with pytest.raises(OperatorUnauthenticated):
        await authenticator.authenticate(credentials(key))
    assert repository.key_lookups == [key.key_id, key.key_id]


async def test_unknown_keys_are_not_cached_so_new_keys_work_at_once() -> None:
    repository = FakeRepository()
    key = new_key()
    authenticator = OperatorAuthenticator(repository, cache_s=5, clock=Clock())
    with pytest.raises(OperatorUnauthenticated):
        await authenticator.authenticate(credentials(key))
    repository.keys[key.key_id] = StoredOperatorKey(key.key_id, key.secret_sha256, None)
    assert (await authenticator.authenticate(credentials(key))).key_id == key.key_id


async def test_cache_is_bounded() -> None:
    repository = FakeRepository()
    keys = [repository.add_key(None) for _ in range(5)]
    clock = Clock()
    authenticator = OperatorAuthenticator(repository, cache_s=5, clock=clock, max_entries=3)
    for key in keys:
        await authenticator.authenticate(credentials(key))
    assert len(authenticator._cache) <= 3
    assert set(authenticator._cache) == {k.key_id for k in keys[-3:]}


async def test_store_errors_propagate() -> None:
    repository = FakeRepository(error=OSError("database down"))
    authenticator = OperatorAuthenticator(repository, cache_s=0)
    with pytest.raises(OSError, match="database down"):
        await authenticator.authenticate(credentials(new_key()))

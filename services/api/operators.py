"""Operators: what they read, and the API's view of their keys.

Plain asyncio, no aiohttp. Verifying a key and its scope is shared with
gateway_auth (``services.shared.operator_auth``); the API's authenticator caches
looked-up keys for ``operator_key_cache_s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Final

from services.api.models import EnvironmentView, Liveness
from services.api.repository import EnvironmentRow

# Named here too for api/handlers.py and api/app.py, which import them from this module.
from services.shared.operator_auth import OperatorAuthenticator as OperatorAuthenticator
from services.shared.operator_auth import OperatorKey as OperatorKey

AUDIT_LIMIT_DEFAULT: Final = 100
AUDIT_LIMIT_MAX: Final = 500


def liveness(
    last_heartbeat_at: datetime | None,
    now: datetime,
    *,
    connected_s: float,
    lost_s: float,
) -> Liveness:
    """An environment's liveness from the age of its last heartbeat (both aware datetimes).

    ``never_seen`` without a heartbeat; ``connected`` up to ``connected_s`` old
    (inclusive, and for a heartbeat stamped slightly in the future by another
    instance's clock); ``unknown`` up to ``lost_s`` (inclusive); ``lost`` beyond.
    Derived when read, so a silent environment changes state without any event.
    """
    if last_heartbeat_at is None:
        return "never_seen"
    age_s = (now - last_heartbeat_at).total_seconds()
    if age_s <= connected_s:
        return "connected"
    if age_s <= lost_s:
        return "unknown"
    return "lost"


def environment_views(
    rows: Sequence[EnvironmentRow], now: datetime, *, connected_s: float, lost_s: float
) -> list[EnvironmentView]:
    """What ``GET .../environments`` answers, sorted by environment id."""
    return [
        EnvironmentView(
            liveness=liveness(row.last_heartbeat_at, now, connected_s=connected_s, lost_s=lost_s),
            # The row's fields are the answer's, less liveness: listed once, in EnvironmentRow.
            **asdict(row),
        )
        for row in sorted(rows, key=lambda r: r.environment_id)
    ]

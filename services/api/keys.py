"""Typed keys of what the app and each request carry (no module-level singletons)."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from services.api.longpoll import CommandPoller, CommandSignals
from services.api.metrics import ApiMetrics
from services.api.repository import FleetRepository
from services.api.revocation_watch import RevocationWatch
from services.api.service import EventService, RecordProducer
from services.api.settings import ApiSettings
from services.shared.operator_auth import OperatorAuthenticator
from services.shared.web.middlewares import REQUEST_ID as REQUEST_ID

SETTINGS: Final = web.AppKey("settings", ApiSettings)
METRICS: Final = web.AppKey("metrics", ApiMetrics)
PRODUCER: Final = web.AppKey[RecordProducer]("producer")
REPOSITORY: Final = web.AppKey[FleetRepository]("repository")
EVENTS: Final = web.AppKey("events", EventService)
OPERATORS: Final = web.AppKey("operators", OperatorAuthenticator)
SIGNALS: Final = web.AppKey("signals", CommandSignals)
"""Wakes waiting long polls; fed by the LISTEN connection (tests call it directly)."""
POLLER: Final = web.AppKey("poller", CommandPoller)
WATCH: Final = web.AppKey("revocation_watch", RevocationWatch)
"""The per-request certificate check, and ending waiting long polls of revoked certificates;
fed by the identity follower."""

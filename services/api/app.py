"""Building the API application: ``create_app(settings)``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from services.api.admission import admission
from services.api.delivery import CommandDeliveries
from services.api.kafka import kafka_producer
from services.api.keys import (
    EVENTS,
    METRICS,
    OPERATORS,
    POLLER,
    PRODUCER,
    REPOSITORY,
    SETTINGS,
    SIGNALS,
    WATCH,
)
from services.api.longpoll import CommandPoller, CommandSignals
from services.api.metrics import ApiMetrics
from services.api.middlewares import metrics_middleware, problem_middleware, request_id_middleware
from services.api.notify_listener import command_listener
from services.api.operators import OperatorAuthenticator
from services.api.repository import FleetRepository, sql_repository
from services.api.revocation_watch import RevocationWatch
from services.api.routes import setup_routes
from services.api.service import EventService, RecordProducer
from services.api.settings import ApiSettings
from services.shared.notify import StateFollower
from services.shared.revocations import IDENTITY_CHANNEL

log = logging.getLogger(__name__)

ProducerFactory = Callable[[ApiSettings], AbstractAsyncContextManager[RecordProducer]]
RepositoryFactory = Callable[[ApiSettings], AbstractAsyncContextManager[FleetRepository]]
ListenerFactory = Callable[[ApiSettings, CommandSignals], AbstractAsyncContextManager[object]]
WatchFactory = Callable[[ApiSettings, RevocationWatch], AbstractAsyncContextManager[object]]


@asynccontextmanager
async def identity_follower(settings: ApiSettings, watch: RevocationWatch) -> AsyncIterator[None]:
    """Follow gateway_auth's revocations (LISTEN + periodic reload) in the background."""
    follower = StateFollower(
        settings.database.libpq_dsn,
        IDENTITY_CHANNEL,
        watch.reload,
        interval_s=settings.identity_reload_s,
        name="fleetplane-api-identity",
    )
    async with follower.running():
        yield


@dataclass(frozen=True, slots=True)
class Dependencies:
    """Where the app's external resources come from.

    The defaults are the production ones (a started Kafka producer, a PostgreSQL
    engine, a LISTEN connection that feeds the given CommandSignals); unit tests
    pass fakes. Each factory is entered when the app starts and exited when it
    cleans up.
    """

    producer: ProducerFactory = kafka_producer
    repository: RepositoryFactory = sql_repository
    command_listener: ListenerFactory = command_listener
    identity_follower: WatchFactory = identity_follower


def create_app(
    settings: ApiSettings, *, dependencies: Dependencies | None = None
) -> web.Application:
    """The API application; nothing connects until it starts (``AppRunner.setup``).

    Startup fails (KafkaError) if no Kafka broker answers; PostgreSQL connects
    lazily, and the LISTEN connection for long polls connects in the background.
    """
    deps = dependencies or Dependencies()
    app = web.Application(
        middlewares=[
            request_id_middleware,
            metrics_middleware,
            admission().middleware,
            problem_middleware,
        ],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings

    @asynccontextmanager
    async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
        app[METRICS] = ApiMetrics.create()
        yield

    @asynccontextmanager
    async def producer_ctx(app: web.Application) -> AsyncIterator[None]:
        async with deps.producer(settings) as producer:
            app[PRODUCER] = producer
            log.info("Kafka producer started (%s)", settings.kafka.kafka_bootstrap)
            yield
            log.info("flushing and stopping the Kafka producer")

    @asynccontextmanager
    async def repository_ctx(app: web.Application) -> AsyncIterator[None]:
        async with deps.repository(settings) as repository:
            app[REPOSITORY] = repository
            yield

    @asynccontextmanager
    async def events_ctx(app: web.Application) -> AsyncIterator[None]:
        app[EVENTS] = EventService(
            producer=app[PRODUCER],
            topic=settings.kafka.events_topic,
            produce_timeout_s=settings.produce_timeout_s,
            retry_after_s=settings.retry_after_s,
            metrics=app[METRICS],
        )
        yield

    @asynccontextmanager
    async def operators_ctx(app: web.Application) -> AsyncIterator[None]:
        app[OPERATORS] = OperatorAuthenticator(
            app[REPOSITORY], cache_s=settings.operator_key_cache_s
        )
        yield

    @asynccontextmanager
    async def commands_ctx(app: web.Application) -> AsyncIterator[None]:
        signals = CommandSignals()
        app[SIGNALS] = signals
        app[POLLER] = CommandPoller(
            app[REPOSITORY], signals, deliveries=CommandDeliveries(app[METRICS].command_delivery)
        )
        async with deps.command_listener(settings, signals):
            yield
            # Waiting polls were already answered by end_polls (on_shutdown).
            log.info("stopping the commands listener")

    @asynccontextmanager
    async def watch_ctx(app: web.Application) -> AsyncIterator[None]:
        app[WATCH] = watch = RevocationWatch(app[METRICS].revocation_delay)
        async with deps.identity_follower(settings, watch):
            yield

    async def end_polls(app: web.Application) -> None:
        # on_shutdown runs after the listening socket closed and before aiohttp
        # waits (up to shutdown_timeout_s) for in-flight requests: waiting polls
        # answer now instead of being cut off.
        signals = app.get(SIGNALS)
        if signals is not None:
            log.info("ended %d waiting poll(s) for shutdown", signals.close())

    app.on_shutdown.append(end_polls)
    app.cleanup_ctx.extend(
        [
            metrics_ctx,
            producer_ctx,
            repository_ctx,
            events_ctx,
            operators_ctx,
            commands_ctx,
            watch_ctx,
        ]
    )
    setup_routes(app)
    return app

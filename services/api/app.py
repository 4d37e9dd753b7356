"""Building the API application: ``create_app(settings)``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from services.api import keys
from services.api.admission import admission
from services.api.delivery import CommandDeliveries
from services.api.kafka import kafka_producer
from services.api.longpoll import CommandPoller, CommandSignals
from services.api.metrics import ApiMetrics
from services.api.operators import OperatorAuthenticator
from services.api.repository import FleetRepository, sql_repository
from services.api.revocation_watch import RevocationWatch
from services.api.routes import setup_routes
from services.api.service import EventService, RecordProducer
from services.api.settings import ApiSettings
from services.shared.certificate_check import CertificateCheck
from services.shared.channels import COMMANDS_CHANNEL, IDENTITY_CHANNEL
from services.shared.notify import Channel, psycopg_follower, reloading
from services.shared.web.middlewares import http_middlewares

log = logging.getLogger(__name__)

ProducerFactory = Callable[[ApiSettings], AbstractAsyncContextManager[RecordProducer]]
RepositoryFactory = Callable[[ApiSettings], AbstractAsyncContextManager[FleetRepository]]
FollowerFactory = Callable[
    [ApiSettings, CommandSignals, RevocationWatch], AbstractAsyncContextManager[object]
]


@asynccontextmanager
async def notify_follower(
    settings: ApiSettings, signals: CommandSignals, watch: RevocationWatch
) -> AsyncIterator[None]:
    """The process's one LISTEN connection, following both channels in the background.

    Commands notifications wake the named environment's long polls (every poll
    after a reconnect, since notifications sent meanwhile are lost); identity
    notifications reload the revocations that end open polls. Does not wait for
    the first connection: the API starts even while PostgreSQL is unreachable,
    and polls answer at their deadline until it is back.
    """

    follower = psycopg_follower(
        settings.database.libpq_dsn,
        [
            Channel(
                COMMANDS_CHANNEL, on_payload=signals.notify_payload, on_listen=signals.wake_all
            ),
            reloading(IDENTITY_CHANNEL, watch.reload, settings.identity_reload_s),
        ],
        name="fleetplane-api-listen",
    )
    async with follower.running():
        yield


@dataclass(frozen=True, slots=True)
class Dependencies:
    """Where the app's external resources come from.

    The defaults are the production ones (a started Kafka producer, a PostgreSQL
    engine, the LISTEN connection that feeds CommandSignals and RevocationWatch); unit tests
    pass fakes. Each factory is entered when the app starts and exited when it
    cleans up.
    """

    producer: ProducerFactory = kafka_producer
    repository: RepositoryFactory = sql_repository
    follower: FollowerFactory = notify_follower


def create_app(
    settings: ApiSettings, *, dependencies: Dependencies | None = None
) -> web.Application:
    """The API application; nothing connects until it starts (``AppRunner.setup``).

    Startup fails (KafkaError) if no Kafka broker answers; PostgreSQL connects
    lazily, and the LISTEN connection connects in the background.
    """
    deps = dependencies or Dependencies()
    app = web.Application(
        middlewares=[
            *http_middlewares(lambda app: app[keys.METRICS], service="API"),
            admission().middleware,
        ],
        client_max_size=settings.max_body_bytes,
    )
    app[keys.SETTINGS] = settings

    @asynccontextmanager
    async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
        app[keys.METRICS] = ApiMetrics.create()
        yield

    @asynccontextmanager
    async def producer_ctx(app: web.Application) -> AsyncIterator[None]:
        async with deps.producer(settings) as producer:
            app[keys.PRODUCER] = producer
            log.info("Kafka producer started (%s)", settings.kafka.kafka_bootstrap)
            yield
            log.info("flushing and stopping the Kafka producer")

    @asynccontextmanager
    async def repository_ctx(app: web.Application) -> AsyncIterator[None]:
        async with deps.repository(settings) as repository:
            app[keys.REPOSITORY] = repository
            yield

    @asynccontextmanager
    async def events_ctx(app: web.Application) -> AsyncIterator[None]:
        app[keys.EVENTS] = EventService(
            producer=app[keys.PRODUCER],
            topic=settings.kafka.events_topic,
            produce_timeout_s=settings.produce_timeout_s,
            retry_after_s=settings.retry_after_s,
            metrics=app[keys.METRICS],
        )
        yield

    @asynccontextmanager
    async def operators_ctx(app: web.Application) -> AsyncIterator[None]:
        app[keys.OPERATORS] = OperatorAuthenticator(
            app[keys.REPOSITORY], cache_s=settings.operator_key_cache_s
        )
        yield

    @asynccontextmanager
    async def commands_ctx(app: web.Application) -> AsyncIterator[None]:
        signals = CommandSignals()
        app[keys.SIGNALS] = signals
        app[keys.POLLER] = CommandPoller(
            app[keys.REPOSITORY],
            signals,
            deliveries=CommandDeliveries(app[keys.METRICS].command_delivery),
        )
        yield

    @asynccontextmanager
    async def watch_ctx(app: web.Application) -> AsyncIterator[None]:
        metrics = app[keys.METRICS]
        check = CertificateCheck(metrics.certificate_checks, metrics.revocation_delay)
        app[keys.WATCH] = watch = RevocationWatch(check)
        async with deps.follower(settings, app[keys.SIGNALS], watch):
            yield
            # Waiting polls were already answered by end_polls (on_shutdown).
            log.info("stopping the LISTEN connection")

    async def end_polls(app: web.Application) -> None:
        # on_shutdown runs after the listening socket closed and before aiohttp
        # waits (up to shutdown_timeout_s) for in-flight requests: waiting polls
        # answer now instead of being cut off.
        signals = app.get(keys.SIGNALS)
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

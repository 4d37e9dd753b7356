"""Building the API application: ``create_app(settings)``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from services.api.kafka import kafka_producer
from services.api.keys import EVENTS, METRICS, PRODUCER, REPOSITORY, SETTINGS
from services.api.metrics import ApiMetrics
from services.api.middlewares import metrics_middleware, problem_middleware, request_id_middleware
from services.api.repository import FleetRepository, sql_repository
from services.api.routes import setup_routes
from services.api.service import EventService, RecordProducer
from services.api.settings import ApiSettings

log = logging.getLogger(__name__)

ProducerFactory = Callable[[ApiSettings], AbstractAsyncContextManager[RecordProducer]]
RepositoryFactory = Callable[[ApiSettings], AbstractAsyncContextManager[FleetRepository]]


@dataclass(frozen=True, slots=True)
class Dependencies:
    """Where the app's external resources come from.

    The defaults are the production ones (a started Kafka producer, a PostgreSQL
    engine); unit tests pass fakes. Each factory is entered when the app starts
    and exited when it cleans up.
    """

    producer: ProducerFactory = kafka_producer
    repository: RepositoryFactory = sql_repository


def create_app(
    settings: ApiSettings, *, dependencies: Dependencies | None = None
) -> web.Application:
    """The API application; nothing connects until it starts (``AppRunner.setup``).

    Startup fails (KafkaError) if no Kafka broker answers; PostgreSQL connects lazily.
    """
    deps = dependencies or Dependencies()
    app = web.Application(
        middlewares=[request_id_middleware, metrics_middleware, problem_middleware],
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

    app.cleanup_ctx.extend([metrics_ctx, producer_ctx, repository_ctx, events_ctx])
    setup_routes(app)
    return app

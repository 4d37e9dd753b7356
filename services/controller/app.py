"""The controller's faust application.

faust drives consumption; the consumer is taught one thing: where a partition
starts. faust would seek to the offsets committed in Kafka, but our source of
truth is the offset stored in PostgreSQL with the effects, so on every
assignment the consumer claims the partition (new epoch) and seeks there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, cast

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from prometheus_client import generate_latest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.controller.agents import register_apply_agent, register_command_timer
from services.controller.metrics import ControllerMetrics
from services.controller.pipeline import Applier, CommandTimer, Ownerships
from services.controller.settings import ControllerSettings
from services.controller.topics import TopicDeadLetters, events_topic
from services.shared.db import create_engine

logger = logging.getLogger(__name__)


class OwnershipConsumer(faust_aiokafka.Consumer):
    """Seeks each assigned partition to the offset stored in PostgreSQL."""

    async def seek_to_committed(self) -> Mapping[Any, int]:
        app = cast(ControllerApp, self.app)
        ownerships = app.ownerships
        assigned = {tp for tp in self.assignment() if tp.topic == ownerships.topic}
        if not assigned:
            return {}
        log_start = await self.earliest_offsets(*assigned)
        claims = await ownerships.claim(
            [tp.partition for tp in assigned],
            {tp.partition: offset for tp, offset in log_start.items()},
        )
        positions: dict[Any, int] = {}
        for tp in assigned:
            claim = claims.get(tp.partition)
            if claim is not None:
                await self.seek(tp, claim.next_offset)
                positions[tp] = claim.next_offset
        return positions


class OwnershipTransport(faust_aiokafka.Transport):
    Consumer = OwnershipConsumer


class ControllerApp(faust.App):
    ownerships: Ownerships
    engine: AsyncEngine
    metrics: ControllerMetrics

    def _new_transport(self) -> Any:
        return OwnershipTransport(self.conf.broker_consumer, self)

    async def on_stop(self) -> None:
        await super().on_stop()
        await self.engine.dispose()


def create_app(settings: ControllerSettings) -> ControllerApp:
    """Build the controller; nothing connects until the faust worker starts it."""
    kafka = settings.kafka
    # faust creates only the last level of its data folder.
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = ControllerApp(
        settings.group_id,
        broker=[f"kafka://{host}" for host in kafka.kafka_bootstrap.split(",")],
        store="memory://",
        autodiscover=False,
        datadir=str(settings.data_dir / settings.instance_id),
        # Topics are created by the deployment with an explicit partition count.
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        # A broker restart can answer the first rejoin with metadata that lacks our
        # topic; the group then assigns nothing until the consumer's metadata is
        # refreshed (aiokafka's default: every 5 minutes).
        consumer_metadata_max_age_ms=5000,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        producer_acks=-1,
        stream_wait_empty=False,
        web_enabled=True,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
    )
    app.metrics = ControllerMetrics()
    app.engine = create_engine(
        settings.database, application_name=f"controller {settings.instance_id}"
    )
    app.ownerships = Ownerships(app.engine, kafka.events_topic, settings.instance_id, app.metrics)

    topic = events_topic(app, kafka.events_topic, kafka.topic_partitions)
    dead_letters = TopicDeadLetters(app, kafka.dead_letter_topic, kafka.events_topic)

    async def seek(partition: int, offset: int) -> None:
        await app.consumer.seek(TP(kafka.events_topic, partition), offset)

    applier = Applier(
        app.engine,
        app.ownerships,
        dead_letters,
        seek,
        app.metrics,
        max_backoff_s=settings.retry_max_backoff_s,
        ack_timeout_s=settings.command_ack_timeout_s,
    )
    register_apply_agent(
        app, topic, applier, batch_max=settings.batch_max_records, within_s=settings.batch_within_s
    )
    timer = CommandTimer(
        app.engine,
        app.ownerships,
        app.metrics,
        ack_timeout_s=settings.command_ack_timeout_s,
        max_attempts=settings.command_max_attempts,
    )
    register_command_timer(app, timer, interval_s=settings.command_timer_interval_s)
    _register_signals(app)
    _register_pages(app)
    return app


def _register_signals(app: ControllerApp) -> None:
    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        revoked: set[TP] = args[0]
        app.ownerships.release(tp.partition for tp in revoked if tp.topic == app.ownerships.topic)

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        assigned: set[TP] = args[0]
        app.metrics.rebalances.inc()
        mine = {tp.partition for tp in assigned if tp.topic == app.ownerships.topic}
        app.ownerships.release(p for p in app.ownerships.held() if p not in mine)


def _register_pages(app: ControllerApp) -> None:
    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        problems = []
        try:
            async with app.engine.connect() as conn:
                await asyncio.wait_for(conn.execute(text("SELECT 1")), timeout=2)
        except Exception as e:
            problems.append(f"database: {e.__class__.__name__}")
        if app.rebalancing:
            problems.append("consumer group is rebalancing")
        body = {
            "status": "ready" if not problems else "not ready",
            "problems": problems,
            "partitions": {
                str(p): {"epoch": c.epoch, "next_offset": c.next_offset}
                for p, c in sorted(app.ownerships.held().items())
            },
            "refused": {str(p): why for p, why in app.ownerships.refused.items()},
        }
        return web.json(body, status=200 if not problems else 503)

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        # aiohttp refuses a charset inside content_type; the exposition format is UTF-8.
        return web.bytes(
            generate_latest(app.metrics.registry), content_type="text/plain; version=0.0.4"
        )

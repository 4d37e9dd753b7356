"""The controller's faust application.

faust runs the process: its web views (health, readiness, status, metrics), its
timers (command expiry, lag, pruning), its producer (dead letters) and the
worker's signal handling. The events topic is consumed by ``PartitionConsumer``
(``consumer.py``), an aiokafka consumer in the controllers' group whose rebalance
callbacks claim each partition (new epoch) and position it at the offset stored
in PostgreSQL with the effects, our source of truth.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
from prometheus_client import generate_latest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.controller.agents import register_command_timer, register_consumer
from services.controller.applier import Applier, RecordSource
from services.controller.claims import Ownerships
from services.controller.command_timer import CommandTimer
from services.controller.consumer import PartitionConsumer
from services.controller.metrics import ControllerMetrics
from services.controller.ops_web import register_ops
from services.controller.settings import ControllerSettings
from services.controller.topics import TopicDeadLetters
from services.shared.db import create_engine, pool_use

logger = logging.getLogger(__name__)


class ControllerApp(faust.App):
    """faust runs the web views, timers and the dead-letter producer; events are
    consumed by ``PartitionConsumer`` (``consumer.py``), not by a faust agent."""

    # faust's boot strategy without its own consumer and conductor: the web server
    # and the producer only. The events topic is consumed by PartitionConsumer, in
    # the controllers' group; a second, idle faust consumer would only add a member.
    producer_only = True

    ownerships: Ownerships
    engine: AsyncEngine
    metrics: ControllerMetrics
    partitions: PartitionConsumer
    drain_timeout_s: float

    async def on_stop(self) -> None:
        # Before faust stops its services: the batch in flight commits, then the
        # consumer leaves the group so the partitions move at once.
        await self.partitions.stop(self.drain_timeout_s)
        await super().on_stop()
        await self.engine.dispose()


def _limit_idle_transactions(engine: AsyncEngine, timeout_s: float) -> None:
    """Have PostgreSQL end any session of ours idle inside a transaction for ``timeout_s``.

    See ``ControllerSettings.idle_in_transaction_timeout_s``: a stopped controller's
    open transaction, and its row locks, must not outlive its ownership.
    """
    statement = f"SET idle_in_transaction_session_timeout = {int(timeout_s * 1000)}"

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Session level, outside any transaction, so a later rollback cannot undo it.
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        cursor = dbapi_connection.cursor()
        cursor.execute(statement)
        cursor.close()
        dbapi_connection.autocommit = autocommit


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
        producer_acks=-1,
        web_enabled=True,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
    )
    app.metrics = ControllerMetrics()
    app.engine = create_engine(
        settings.database, application_name=f"controller {settings.instance_id}"
    )
    _limit_idle_transactions(app.engine, settings.idle_in_transaction_timeout_s)
    app.ownerships = Ownerships(
        app.engine,
        kafka.events_topic,
        settings.instance_id,
        app.metrics,
        max_backoff_s=settings.retry_max_backoff_s,
    )

    dead_letters = TopicDeadLetters(app, kafka.dead_letter_topic, kafka.events_topic)

    def make_applier(source: RecordSource) -> Applier:
        return Applier(
            app.engine,
            app.ownerships,
            dead_letters,
            source,
            app.metrics,
            max_backoff_s=settings.retry_max_backoff_s,
            ack_timeout_s=settings.command_ack_timeout_s,
        )

    app.partitions = PartitionConsumer(settings, app.ownerships, app.metrics, make_applier)
    applier = app.partitions.applier
    app.drain_timeout_s = settings.shutdown_drain_timeout_s
    register_consumer(app, app.partitions)
    timer = CommandTimer(
        app.engine,
        app.ownerships,
        app.metrics,
        ack_timeout_s=settings.command_ack_timeout_s,
        max_attempts=settings.command_max_attempts,
    )
    register_command_timer(app, timer, interval_s=settings.command_timer_interval_s)
    _register_pages(app)
    # /status, the lag gauge and record pruning (the ops view; ops_web.py).
    register_ops(
        app,
        settings,
        engine=app.engine,
        ownerships=app.ownerships,
        metrics=app.metrics,
        pending=lambda: applier.pending,
        log_ends=app.partitions.log_ends,
    )
    return app


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
        if app.partitions.rebalancing:
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
        for state, connections in pool_use(app.engine).items():
            app.metrics.database_pool.labels(state).set(connections)
        # aiohttp refuses a charset inside content_type; the exposition format is UTF-8.
        return web.bytes(
            generate_latest(app.metrics.registry), content_type="text/plain; version=0.0.4"
        )

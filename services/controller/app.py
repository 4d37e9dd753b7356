"""The controller's faust application.

faust drives consumption; the consumer is taught one thing: where a partition
starts. faust would seek to the offsets committed in Kafka, but our source of
truth is the offset stored in PostgreSQL with the effects, so on every
assignment the consumer claims the partition (new epoch) and seeks there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any, cast

import faust
from aiokafka.errors import IllegalStateError
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from prometheus_client import generate_latest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.controller.agents import register_apply_agent, register_command_timer
from services.controller.metrics import ControllerMetrics
from services.controller.ops_web import register_ops
from services.controller.pipeline import Applier, CommandTimer, GuardedSeek, Ownerships
from services.controller.settings import ControllerSettings
from services.controller.topics import TopicDeadLetters, events_topic
from services.shared.db import create_engine, pool_use

logger = logging.getLogger(__name__)


class OwnershipConsumer(faust_aiokafka.Consumer):
    """Seeks each assigned partition to the offset stored in PostgreSQL."""

    async def seek_to_committed(self) -> Mapping[Any, int]:
        app = cast(ControllerApp, self.app)
        ownerships = app.ownerships
        assigned = {tp for tp in self.assignment() if tp.topic == ownerships.topic}
        if not assigned:
            return {}
        if app.consumer_generation_id != app.claimed_generation:
            # Every generation claims every assigned partition afresh, even one held
            # before: another member may have claimed it in a generation between,
            # and a batch applied under the old claim would be fenced with nothing
            # left to claim the partition again (a stall until the next rebalance).
            # faust seeks twice per assignment (recovery, fetcher); the second claims
            # nothing new.
            ownerships.release(list(ownerships.held()))
            app.claimed_generation = app.consumer_generation_id
        log_start = await self.earliest_offsets(*assigned)
        claims = await ownerships.claim(
            [tp.partition for tp in assigned],
            {tp.partition: offset for tp, offset in log_start.items()},
        )
        positions = {
            tp: claims[tp.partition].next_offset for tp in assigned if tp.partition in claims
        }
        try:
            await self.seek_in_consumer_thread(positions)
        except IllegalStateError as e:
            # A newer rebalance took a partition away while we claimed; that
            # rebalance seeks what it assigns, from its own claims.
            logger.info("assignment changed while seeking to the stored offsets: %s", e)
        return positions

    async def seek_in_consumer_thread(self, positions: Mapping[TP, int]) -> None:
        """Seek partitions from the consumer's own thread.

        faust's ``seek`` calls aiokafka from the calling thread, but aiokafka's
        fetcher lives in faust's consumer thread: a seek from the event loop that
        applies batches races the fetcher (seen as a KeyError in
        ``Fetcher.fetched_records`` that crashes the worker). ``seek_wait`` runs the
        seek in the consumer thread and waits for it.
        """
        if positions:
            await self.seek_wait(positions)

    async def leave_group(self, timeout_s: float) -> None:
        """Leave the consumer group now, while faust can still answer aiokafka.

        A rebalance needs faust's event loop to run its assignment callbacks. If
        faust's own stop leaves the group, a rebalance running at that moment waits
        for callbacks that never run, and the consumer never closes (seen here
        whenever a stop met a rebalance). Unsubscribing first lets any such
        rebalance finish and sends LeaveGroup at once.
        """
        thread = self._thread

        async def unsubscribe() -> None:
            thread._ensure_consumer().unsubscribe()

        try:
            await asyncio.wait_for(thread.call_thread(unsubscribe), timeout_s)
        except Exception as e:  # faust's stop leaves the group, or the session ends
            logger.warning("could not leave the consumer group early: %r", e)


class OwnershipTransport(faust_aiokafka.Transport):
    Consumer = OwnershipConsumer


class ControllerApp(faust.App):
    ownerships: Ownerships
    engine: AsyncEngine
    metrics: ControllerMetrics
    applier: Applier
    drain_timeout_s: float
    claimed_generation: int = -1
    """The consumer-group generation whose assignment was last claimed."""

    def _new_transport(self) -> Any:
        return OwnershipTransport(self.conf.broker_consumer, self)

    async def on_stop(self) -> None:
        # Runs before faust stops its agents (which cancels the batch being applied)
        # and its consumer (which leaves the group, handing the partitions over).
        if not await self.applier.drain(self.drain_timeout_s):
            logger.warning(
                "the batch being applied did not finish within %.0f s; it rolls back",
                self.drain_timeout_s,
            )
        # What faust's stop does first (App._stop_consumer), so that nothing reads
        # partitions about to be unassigned; then leave the group at once.
        consumer = cast(OwnershipConsumer, self.consumer)
        assignment = consumer.assignment()
        consumer.stop_flow()
        self.flow_control.suspend()
        consumer.pause_partitions(assignment)
        self.flow_control.clear()
        await self._stop_fetcher()
        await consumer.leave_group(timeout_s=2.0)
        _exit_if_still_stopping_after(STOP_GRACE_S)
        await super().on_stop()
        await self.engine.dispose()


STOP_GRACE_S = 5.0
"""How long faust may take to stop once the batch in flight is done (it takes ~1.5 s)."""


def _exit_if_still_stopping_after(grace_s: float) -> None:
    """End the process if faust's stop hangs anyway.

    A safety net: before ``leave_group`` existed, a SIGTERM meeting a rebalance
    left aiokafka's coordinator retrying a closed connection for ever, and
    faust-streaming and aiokafka have more open reports of hangs on stop. Nothing
    is lost by exiting: every effect is committed or rolled back in PostgreSQL,
    and the group drops this member after the session timeout.
    """

    def exit_now() -> None:
        logger.error(
            "still stopping %.0f s after the last batch; exiting without leaving the group "
            "(its session times out)",
            grace_s,
        )
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(grace_s, exit_now)
    timer.daemon = True  # a normal stop ends the process before it fires
    timer.start()


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
        consumer_auto_offset_reset="earliest",
        # A broker restart can answer the first rejoin with metadata that lacks our
        # topic; the group then assigns nothing until the consumer's metadata is
        # refreshed (aiokafka's default: every 5 minutes).
        consumer_metadata_max_age_ms=5000,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
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
    _limit_idle_transactions(app.engine, settings.idle_in_transaction_timeout_s)
    app.ownerships = Ownerships(
        app.engine,
        kafka.events_topic,
        settings.instance_id,
        app.metrics,
        max_backoff_s=settings.retry_max_backoff_s,
    )

    topic = events_topic(app, kafka.events_topic, kafka.topic_partitions)
    dead_letters = TopicDeadLetters(app, kafka.dead_letter_topic, kafka.events_topic)

    async def seek(partition: int, offset: int) -> None:
        consumer = cast(OwnershipConsumer, app.consumer)
        await consumer.seek_in_consumer_thread({TP(kafka.events_topic, partition): offset})

    def assigned(partition: int) -> bool:
        return TP(kafka.events_topic, partition) in app.consumer.assignment()

    async def log_start(partition: int) -> int:
        tp = TP(kafka.events_topic, partition)
        return int((await app.consumer.earliest_offsets(tp))[tp])

    applier = Applier(
        app.engine,
        app.ownerships,
        dead_letters,
        GuardedSeek(seek, assigned),
        app.metrics,
        max_backoff_s=settings.retry_max_backoff_s,
        ack_timeout_s=settings.command_ack_timeout_s,
        log_start=log_start,
        test_pause_file=settings.test_pause_file,
    )
    app.applier = applier
    app.drain_timeout_s = settings.shutdown_drain_timeout_s
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
    # /status, the lag gauge and record pruning (the ops view; ops_web.py).
    register_ops(
        app,
        settings,
        engine=app.engine,
        ownerships=app.ownerships,
        metrics=app.metrics,
        pending=lambda: applier.pending,
    )
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
        for state, connections in pool_use(app.engine).items():
            app.metrics.database_pool.labels(state).set(connections)
        # aiohttp refuses a charset inside content_type; the exposition format is UTF-8.
        return web.bytes(
            generate_latest(app.metrics.registry), content_type="text/plain; version=0.0.4"
        )

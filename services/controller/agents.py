"""The faust tasks that drive the controller: consuming events and the command timer."""

from __future__ import annotations

import logging

import faust

from services.controller.command_timer import CommandTimer
from services.controller.consumer import PartitionConsumer

logger = logging.getLogger(__name__)


def register_consumer(app: faust.App, consumer: PartitionConsumer) -> None:
    """Join the group once the app has started; stop the worker if consuming fails.

    Records are handled inside (poison is dead-lettered, outages are retried), so
    what ends the loop is a fault of the process itself: the worker stops, and its
    supervisor (Kubernetes, ``make run``) starts a fresh one, which resumes at the
    stored offsets.
    """

    @app.task  # type: ignore[untyped-decorator]  # faust leaves task untyped
    async def consume_events() -> None:
        try:
            await consumer.start()
            await consumer.run()
        except Exception as e:
            logger.critical("consuming the events topic failed; stopping", exc_info=e)
            await app.crash(e)


def register_command_timer(app: faust.App, timer: CommandTimer, *, interval_s: float) -> None:
    @app.timer(interval=interval_s, name="expire-overdue-commands")  # type: ignore[untyped-decorator]  # faust leaves timer untyped
    async def expire_overdue_commands() -> None:
        await timer.tick()

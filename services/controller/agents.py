"""The faust agent that feeds consumed records to the apply pipeline."""

from __future__ import annotations

from typing import Any

import faust

from services.controller.handlers import Delivered
from services.controller.pipeline import Applier, CommandTimer


def register_apply_agent(
    app: faust.App, topic: Any, applier: Applier, *, batch_max: int, within_s: float
) -> None:
    # concurrency stays 1: with more, faust can commit offsets past records still
    # in flight (faust-streaming#606), and per-partition order would be lost.
    @app.agent(topic, name="apply-events", concurrency=1)
    async def apply_events(stream: Any) -> None:
        async for events in stream.take_events(batch_max, within=within_s):
            await applier.apply(
                [
                    Delivered(
                        partition=e.message.partition,
                        offset=e.message.offset,
                        key=e.message.key,
                        value=e.message.value,
                        timestamp_s=e.message.timestamp,
                    )
                    for e in events
                ]
            )


def register_command_timer(app: faust.App, timer: CommandTimer, *, interval_s: float) -> None:
    @app.timer(interval=interval_s, name="expire-overdue-commands")  # type: ignore[untyped-decorator]  # faust leaves timer untyped
    async def expire_overdue_commands() -> None:
        await timer.tick()

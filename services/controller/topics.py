"""The controller's Kafka topics, as faust topics (one of three modules importing faust)."""

from __future__ import annotations

from typing import Any

import faust

from services.controller.handlers import Poison


def events_topic(app: faust.App, name: str, partitions: int) -> Any:
    """Agent events and operator changes; raw bytes, decoded by the handlers."""
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
        internal=False,
    )


class TopicDeadLetters:
    """Dead-letter sink: the poison record's bytes, with why and where in headers."""

    def __init__(self, app: faust.App, name: str, source_topic: str) -> None:
        self._topic = app.topic(name, key_serializer="raw", value_serializer="raw", internal=False)
        self._source_topic = source_topic

    async def send(self, poison: Poison) -> None:
        record = poison.delivered
        headers = {
            "fleetplane-dlq-reason": poison.reason.encode(),
            "fleetplane-dlq-detail": poison.detail.encode()[:1024],
            "fleetplane-source-topic": self._source_topic.encode(),
            "fleetplane-source-partition": str(record.partition).encode(),
            "fleetplane-source-offset": str(record.offset).encode(),
        }
        if poison.sqlstate is not None:
            headers["fleetplane-dlq-sqlstate"] = poison.sqlstate.encode()
        pending = await self._topic.send(key=record.key, value=record.value or b"", headers=headers)
        # The offset that covers this record is stored only after the broker has it.
        await pending

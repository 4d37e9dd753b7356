"""Test doubles for the simulator: a scripted transport, a recording sleep, commands."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bench.simulator.transport import Reply
from services.shared.commands import Command, CommandResource

Handler = Callable[[str, str, bytes | None], Awaitable[Reply] | Reply]


@dataclass
class Call:
    method: str
    path: str
    body: bytes | None

    def event_ids(self) -> list[str]:
        assert self.body is not None
        return [event["id"] for event in json.loads(self.body)["events"]]

    def events(self) -> list[dict[str, Any]]:
        assert self.body is not None
        events: list[dict[str, Any]] = json.loads(self.body)["events"]
        return events


@dataclass
class ScriptedTransport:
    """Answers POSTs from ``script`` in order (an exception is raised), then ``handler``."""

    script: list[Reply | BaseException] = field(default_factory=list)
    handler: Handler | None = None
    calls: list[Call] = field(default_factory=list)

    async def request(
        self, method: str, path: str, *, body: bytes | None = None, timeout_s: float
    ) -> Reply:
        self.calls.append(Call(method, path, body))
        if self.script:
            answer = self.script.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer
        if self.handler is None:
            raise AssertionError(f"unexpected request {method} {path}")
        result = self.handler(method, path, body)
        return await result if isinstance(result, Awaitable) else result


@dataclass
class RecordingSleep:
    """Stands in for asyncio.sleep in the retry policy: records, waits no real time."""

    delays: list[float] = field(default_factory=list)

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


def accepted(ids: list[str] | None = None) -> Reply:
    return Reply(202, json.dumps({"accepted": ids or []}).encode())


def command(
    command_id: int,
    epoch: int,
    *,
    action: str = "update",
    name: str = "res-0",
    kind: str = "deployment",
    version: str | None = "2.0.0",
) -> Command:
    return Command.model_validate(
        {
            "id": command_id,
            "epoch": epoch,
            "revision": 1,
            "action": action,
            "resource": CommandResource(kind=kind, name=name, version=version).model_dump(),
            "attempt": 1,
        }
    )

"""Event builders for one agent boot: ids, boot id, per-boot sequence numbers.

Every builder returns a plain JSON-ready dict that is valid as one element of
``services.shared.events.EventBatch.events``; the unit tests validate them there.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

AGENT_VERSION: Final = "1.4.2"

Event = dict[str, Any]


@dataclass(frozen=True, order=True)
class Resource:
    """One simulated resource as an agent observes it."""

    kind: str
    name: str
    version: str


def new_boot_id() -> str:
    """A fresh boot id, unique across runs even with ``--seed``.

    It is drawn from the OS, not the seeded generator: event ids derive from it,
    and the controller deduplicates by (customer, agent, event id), so a rerun
    with the same seed must not repeat ids or all its events would be dropped.
    """
    return f"b{uuid.uuid4().hex[:24]}"


class EventFactory:
    """Builds the events of one boot; ``seq`` starts at 1 and grows by one per event.

    Event ids are ``<boot_id>-<seq>``: unique per agent without any registry, and
    stable once built, so a retried batch carries exactly the same ids.
    """

    def __init__(self, boot_id: str | None = None) -> None:
        self.boot_id = boot_id or new_boot_id()
        self._seq = 0

    @property
    def last_seq(self) -> int:
        return self._seq

    def heartbeat(
        self, health: Literal["ok", "degraded", "failing"] = "ok", message: str = ""
    ) -> Event:
        return self._event(
            "heartbeat", {"agent_version": AGENT_VERSION, "health": health, "message": message}
        )

    def observed_state(self, resources: Iterable[Resource]) -> Event:
        listed = [{"kind": r.kind, "name": r.name, "version": r.version} for r in resources]
        return self._event("observed_state", {"resources": listed})

    def command_result(
        self,
        command_id: int,
        epoch: int,
        outcome: Literal["succeeded", "failed"],
        message: str = "",
    ) -> Event:
        return self._event(
            "command_result",
            {"command_id": command_id, "epoch": epoch, "outcome": outcome, "message": message},
        )

    def _event(self, kind: str, payload: dict[str, Any]) -> Event:
        self._seq += 1
        return {
            "id": f"{self.boot_id}-{self._seq}",
            "boot_id": self.boot_id,
            "seq": self._seq,
            "type": kind,
            "payload": payload,
        }

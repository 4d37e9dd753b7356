"""Event bodies for the API's unit tests."""

from __future__ import annotations

import json
from typing import Any


def heartbeat(event_id: str, seq: int = 1, **payload: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "boot_id": "boot-1",
        "seq": seq,
        "type": "heartbeat",
        "payload": {"agent_version": "1.2.3", "health": "ok", **payload},
    }


def observed(event_id: str, resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": event_id,
        "boot_id": "boot-1",
        "seq": 2,
        "type": "observed_state",
        "payload": {"resources": resources},
    }


def batch_body(*events: dict[str, Any]) -> bytes:
    return json.dumps({"events": list(events)}).encode()

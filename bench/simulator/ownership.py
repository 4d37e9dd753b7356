"""Who owns which partition, live, from a controller's ``/status`` ops endpoint.

Every controller serves the same view of the whole group (read from the
ownership table and Kafka), so the first ``--controller-status`` URL that answers
is enough; the others are there for when that controller is down or moving.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any, Final

from bench.simulator.stats import Stats
from bench.simulator.transport import NETWORK_ERRORS, Transport

log = logging.getLogger(__name__)

STATUS_EVERY_S: Final = 2.0
STATUS_TIMEOUT_S: Final = 5.0


def ownership_summary(status: dict[str, Any]) -> dict[str, Any]:
    """Per owner: its partitions, their lag and events/s; plus the unowned ones.

    Raises KeyError or TypeError when ``status`` is not a ``/status`` body.
    """
    owners: dict[str, dict[str, Any]] = {}
    unowned: list[int] = []
    for p in status["partitions"]:
        if p["owner"] is None:
            unowned.append(p["partition"])
            continue
        mine = owners.setdefault(p["owner"], {"partitions": [], "lag": 0, "events_per_s": 0.0})
        mine["partitions"].append(p["partition"])
        mine["lag"] += p["lag"]
        mine["events_per_s"] = round(mine["events_per_s"] + p["events_per_s"], 1)
    return {
        "taken_at": status["taken_at"],
        "total_lag": status["total_lag"],
        "owners": dict(sorted(owners.items())),
        "unowned": unowned,
    }


def partitions_by_owner(summary: dict[str, Any]) -> dict[str, list[int]]:
    """The part of a summary that changes only when partitions change hands."""
    return {owner: held["partitions"] for owner, held in summary["owners"].items()}


async def status_loop(urls: Sequence[str], transport: Transport, stats: Stats) -> None:
    """Poll until cancelled; keeps the last view when no controller answers."""
    while True:
        for url in urls:
            try:
                reply = await transport.request("GET", url, timeout_s=STATUS_TIMEOUT_S)
                if reply.status != 200:
                    raise ValueError(f"HTTP {reply.status}")
                stats.ownership = ownership_summary(json.loads(reply.body))
                break
            except (*NETWORK_ERRORS, ValueError, KeyError, TypeError) as error:
                kind = f"status:{type(error).__name__}"
                stats.error(kind)
                if stats.errors[kind] <= 3:
                    log.warning("reading %s failed: %s", url, error)
        await asyncio.sleep(STATUS_EVERY_S)

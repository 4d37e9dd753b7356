"""A controller that can be made a zombie: ``python -m tests.support.zombie_controller``.

The production controller (``python -m services.controller``, same options) with
one observer installed on its applier: when the file named by
``FLEETPLANE_TEST_PAUSE_FILE`` exists, the next apply transaction that wrote event
records stops the whole process (SIGSTOP, heartbeat included) with its effects
written and its fences not yet checked, and writes ``<file>.holding`` saying what
it holds. Fires once per arming (the test creates the file). Used by the chaos tests
to show that a paused owner's transaction is fenced.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from services.controller.__main__ import main
from services.controller.applier import Applier
from services.controller.store import PendingFence

PAUSE_FILE_VARIABLE = "FLEETPLANE_TEST_PAUSE_FILE"

logger = logging.getLogger(__name__)


def stop_when_armed(armed: Path) -> Callable[[list[PendingFence]], None]:
    def before_fence(pending: list[PendingFence]) -> None:
        if not any(p.event_ids for p in pending) or not armed.exists():
            return
        armed.unlink()
        holding = {
            "pid": os.getpid(),
            "partitions": {
                str(p.partition): {
                    "epoch": p.epoch,
                    "next_offset": p.next_offset,
                    "event_ids": p.event_ids,
                }
                for p in pending
            },
        }
        marker = armed.with_name(armed.name + ".holding")
        partial = marker.with_name(marker.name + ".partial")
        partial.write_text(json.dumps(holding))
        partial.rename(marker)  # the test never reads a half-written file
        logger.warning("test pause file: stopping with an open transaction (%s)", marker)
        os.kill(os.getpid(), signal.SIGSTOP)
        logger.warning("test pause file: continued")

    return before_fence


def install(applier: Applier) -> None:
    armed = os.environ.get(PAUSE_FILE_VARIABLE)
    if armed:
        applier.before_fence = stop_when_armed(Path(armed))


if __name__ == "__main__":
    sys.exit(main(customize=install))

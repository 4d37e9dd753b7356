"""Command delivery latency: how long a due command offer waited for an agent's long poll.

Definition: from the moment an offer became due (``not_before`` of the command's
current attempt, on the database's clock) to the moment a long poll of this API
process first hands that offer to an agent (the reply is made). An agent keeps
getting a pending command on every poll until its result is applied, and several
agents of an environment may poll for it: only the first hand-out of each
(command id, attempt) counts, remembered in a bounded ledger.

Plain Python, no aiohttp and no database driver: the poller calls ``handed_out``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Final, Literal

from prometheus_client import Histogram

from services.shared.commands import Command

LEDGER_CAPACITY: Final = 65_536
"""Offers remembered per process. A pending command is handed out again within
seconds (the agent polls at once after commands, until its result is applied), so
the ledger only needs the offers of the last few seconds; an offer evicted and then
handed out again would be counted twice. About 10 MB at most."""

BecameDue = Literal["during_poll", "before_poll"]
BECAME_DUE: Final[tuple[BecameDue, ...]] = ("during_poll", "before_poll")


class DeliveryLedger:
    """The (command id, attempt) offers this process has handed out, the latest ``capacity``.

    Used from one event loop only. A repeated offer moves to the newest end, so an
    offer handed out again and again is the last to be forgotten.
    """

    def __init__(self, capacity: int = LEDGER_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._seen: OrderedDict[tuple[int, int], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def first_hand_out(self, command_id: int, attempt: int) -> bool:
        """True the first time this offer is seen (and remember it); False after."""
        key = (command_id, attempt)
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True


class CommandDeliveries:
    """Observes ``fleetplane_api_command_delivery_seconds`` once per offer and process."""

    def __init__(self, histogram: Histogram, ledger: DeliveryLedger | None = None) -> None:
        self.histogram = histogram
        self.ledger = ledger or DeliveryLedger()
        # Every label value exported from start-up (count 0), so rules and panels
        # see the series before the first command.
        for became_due in BECAME_DUE:
            histogram.labels(became_due=became_due)

    def handed_out(
        self, commands: Sequence[Command], due_for_s: Sequence[float], poll_open_s: float
    ) -> int:
        """Record commands handed to an agent now; returns how many were first hand-outs.

        ``due_for_s[i]`` is how long ``commands[i]``'s offer has been due, now;
        ``poll_open_s`` how long the poll handing them out has been open. Commands
        without a due time (a repository that gives none) are not observed.
        """
        observed = 0
        for command, due_s in zip(commands, due_for_s, strict=False):
            if not self.ledger.first_hand_out(command.id, command.attempt):
                continue
            due_s = max(due_s, 0.0)
            became_due: BecameDue = "during_poll" if due_s <= poll_open_s else "before_poll"
            self.histogram.labels(became_due=became_due).observe(due_s)
            observed += 1
        return observed

"""One agent's simulated resources and its command rules, with no I/O.

The rules, from ``services.shared.commands``:

* a command whose epoch is older than the newest epoch the agent has seen was
  created by a controller that has since lost the customer's partition (a
  zombie): ignore it;
* a command id the agent already took is a re-offer (the server saw no result
  in time): never apply it twice.
"""

from __future__ import annotations

import enum
import random
from collections import OrderedDict
from typing import Final, Literal

from bench.simulator.events import Resource
from services.shared.commands import Command

RESOURCE_KINDS: Final = ("deployment", "service", "config-map", "cron-job")
TAKEN_SENT: Final = 50
"""How many of the latest taken command ids a poll names (``taken``): the server offers
those no more, so a poll waits for new commands instead of getting re-offers back."""
REMEMBERED_COMMANDS: Final = 10_000
"""How many taken command ids an agent remembers; re-offers come soon, never after
thousands of newer commands, and the bound keeps long runs from growing."""


class Decision(enum.Enum):
    APPLY = "apply"
    STALE_EPOCH = "stale_epoch"
    DUPLICATE = "duplicate"


class AgentState:
    """Resources keyed by (kind, name) plus the epoch and command-id memory."""

    def __init__(self, resources: dict[tuple[str, str], str] | None = None) -> None:
        self.resources: dict[tuple[str, str], str] = dict(resources or {})
        self.newest_epoch: int | None = None
        self._taken: OrderedDict[int, None] = OrderedDict()

    @classmethod
    def with_initial_resources(cls, count: int, rng: random.Random) -> AgentState:
        """``count`` resources of assorted kinds, all at version 1.0.<n>."""
        resources = {
            (RESOURCE_KINDS[n % len(RESOURCE_KINDS)], f"res-{n}"): f"1.0.{rng.randrange(10)}"
            for n in range(count)
        }
        return cls(resources)

    def admit(self, command: Command) -> Decision:
        """Decide what to do with an offered command and remember the decision.

        Call once per offer, in the order the server listed the commands. An
        APPLY marks the id as taken at once, so a re-offer that arrives while the
        first copy is still being applied is a DUPLICATE, and raises the newest
        epoch seen. The duplicate check comes first: a re-offer is not news about
        epochs.
        """
        if command.id in self._taken:
            self._taken.move_to_end(command.id)
            return Decision.DUPLICATE
        if self.newest_epoch is not None and command.epoch < self.newest_epoch:
            return Decision.STALE_EPOCH
        self.newest_epoch = command.epoch
        self._taken[command.id] = None
        if len(self._taken) > REMEMBERED_COMMANDS:
            self._taken.popitem(last=False)
        return Decision.APPLY

    def latest_taken(self, count: int = TAKEN_SENT) -> list[int]:
        """The ids of the latest ``count`` commands taken, oldest first."""
        return list(self._taken)[-count:]

    def apply(self, command: Command) -> str | None:
        """Change the resources as the command says; None on success, else why not.

        Create and update set the version (update of a missing resource creates
        it: the end state is what matters); delete removes and is a no-op when the
        resource is already gone, so applying is idempotent either way.
        """
        key = (command.resource.kind, command.resource.name)
        if command.action == "delete":
            self.resources.pop(key, None)
            return None
        if command.resource.version is None:
            return f"{command.action} without a version"
        self.resources[key] = command.resource.version
        return None

    def observed(self) -> list[Resource]:
        """The full resource list for an ``observed_state`` event, in a stable order."""
        return [
            Resource(kind, name, version)
            for (kind, name), version in sorted(self.resources.items())
        ]


def run_command(
    state: AgentState, command: Command, *, simulate_failure: bool
) -> tuple[Literal["succeeded", "failed"], str]:
    """Apply an admitted command and say how it went, for its ``command_result``.

    A simulated failure leaves the resources untouched, as a real failed rollout
    would leave the old version running.
    """
    if simulate_failure:
        return "failed", "simulated failure"
    problem = state.apply(command)
    return ("succeeded", "") if problem is None else ("failed", problem)

"""Long-polling for commands (``GET /v1/commands?wait=<s>``) without polling the database.

The controller writes commands and, in the same transaction, NOTIFYs
``fleetplane_commands`` with ``<customer>/<environment>``. Each API process holds
one LISTEN connection (``services.shared.notify``, started in ``app.py``) that
feeds a ``CommandSignals`` hub; every waiting poll subscribes to its own
environment and is woken only by that environment's notifications (or by
``wake_all`` after the LISTEN connection was re-established, since
notifications sent while it was down are lost).

No lost wake-up: a poll subscribes before its first query and clears its
subscription before every query, so a notification that lands between a query
and the wait leaves the subscription set and the wait returns at once.

One query for many polls: a notification wakes every poll of its environment
(a hundred agents of one environment, all at once), and each needs the
environment's pending commands as of after that notification. Any query of
the environment started after the poll cleared its subscription answers that
as well as one of its own, so a poll joins such a query in flight instead of
starting another (``CommandSignals.sequence`` orders queries and signals).

Plain asyncio, no aiohttp and no database driver: the repository and the hub
are passed in.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final, Protocol

from services.api.delivery import CommandDeliveries
from services.api.repository import PendingCommands
from services.shared.channels import COMMANDS_CHANNEL as COMMANDS_CHANNEL
from services.shared.commands import MAX_WAIT_S, CommandsReply
from services.shared.identity import IdentityError, check_id
from services.shared.params import query_int
from services.shared.problems import FieldError, ValidationFailed

log = logging.getLogger(__name__)

DEFAULT_WAIT_S: Final = 20
"""``wait`` when the query does not give one."""
NEXT_POLL_S: Final = (0.5, 1.5)
"""Range of ``next_poll_s`` after an empty reply: uniform, so agents whose polls ended
together (a deadline, a restart) do not come back in lockstep. 0 after commands, since
more may be queued behind the ones returned."""
MAX_TAKEN: Final = 100
"""Most command ids a poll may name in ``taken``."""
MIN_RECHECK_S: Final = 0.05
"""Shortest self-timed wait for a held-back command, so clock rounding cannot spin."""

_ID: Final = re.compile(r"[0-9]{1,19}")

EnvironmentKey = tuple[str, str]


def parse_wait(values: Sequence[str]) -> int:
    """The ``wait`` query parameter (all its values, usually none or one) in seconds.

    Absent: DEFAULT_WAIT_S. Raises ValidationFailed naming ``wait`` unless there is
    exactly one value that is a decimal integer from 0 to MAX_WAIT_S.
    """
    return query_int(values, "wait", minimum=0, maximum=MAX_WAIT_S, default=DEFAULT_WAIT_S)


def parse_taken(values: Sequence[str]) -> frozenset[int]:
    """The ``taken`` query parameter: command ids the agent already took, not offered again.

    At most one value, a comma-separated list of 1 to MAX_TAKEN decimal numbers of
    at most 19 digits (a bigint's); absent means none. A number that is no
    command's id filters nothing. Raises ValidationFailed naming ``taken`` otherwise.
    """
    if not values:
        return frozenset()
    message = f"must be one list of 1 to {MAX_TAKEN} comma-separated command ids"
    if len(values) == 1:
        parts = values[0].split(",")
        if len(parts) <= MAX_TAKEN and all(_ID.fullmatch(part) for part in parts):
            return frozenset(int(part) for part in parts)
    raise ValidationFailed(f"the taken parameter {message}", errors=(FieldError("taken", message),))


def next_poll_delay(uniform: Callable[[float, float], float] = random.uniform) -> float:
    """``next_poll_s`` for an empty reply (see NEXT_POLL_S)."""
    return round(uniform(*NEXT_POLL_S), 3)


def parse_payload(payload: str) -> EnvironmentKey | None:
    """(customer, environment) from a ``<customer>/<environment>`` payload; None if malformed."""
    customer_id, sep, environment_id = payload.partition("/")
    if not sep:
        return None
    try:
        return check_id("customer", customer_id), check_id("environment", environment_id)
    except IdentityError:
        return None


class Subscription:
    """One waiting poll's interest in one environment. Create with ``CommandSignals.subscribe``."""

    __slots__ = ("_event", "key")

    def __init__(self, key: EnvironmentKey) -> None:
        self.key = key
        self._event = asyncio.Event()

    @property
    def signalled(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        """Forget past signals; call before each query, never after."""
        self._event.clear()

    def signal(self) -> None:
        self._event.set()

    async def wait(self, timeout_s: float) -> bool:
        """True as soon as signalled (at once if already), False after ``timeout_s``."""
        if self._event.is_set():
            return True
        if timeout_s <= 0:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                await self._event.wait()
        except TimeoutError:
            return False
        return True


class CommandSignals:
    """Wakes waiting polls by environment. One per process, used from its event loop only.

    Cost is one asyncio.Event per waiting poll and a dict entry per environment
    with waiters; a notification touches only that environment's waiters.
    """

    def __init__(self) -> None:
        self._waiting: dict[EnvironmentKey, set[Subscription]] = {}
        self.closed = False
        """Set by ``close``: polls stop waiting."""
        self.sequence = 0
        """Signals so far (any environment): a query started at sequence n sees every
        change whose notification was counted before it."""

    def close(self) -> int:
        """End every wait now and every later one at once (the process is shutting down).

        Returns how many waiters were woken.
        """
        self.closed = True
        return self.wake_all()

    @property
    def waiting(self) -> int:
        """Subscriptions currently registered."""
        return sum(len(subscriptions) for subscriptions in self._waiting.values())

    @contextmanager
    def subscribe(self, customer_id: str, environment_id: str) -> Iterator[Subscription]:
        """Register a subscription for the block's duration."""
        key = (customer_id, environment_id)
        subscription = Subscription(key)
        self._waiting.setdefault(key, set()).add(subscription)
        try:
            yield subscription
        finally:
            subscriptions = self._waiting.get(key)
            if subscriptions is not None:
                subscriptions.discard(subscription)
                if not subscriptions:
                    del self._waiting[key]

    def notify(self, customer_id: str, environment_id: str) -> int:
        """Signal the environment's waiters; returns how many there were."""
        self.sequence += 1
        subscriptions = self._waiting.get((customer_id, environment_id), ())
        for subscription in subscriptions:
            subscription.signal()
        return len(subscriptions)

    def notify_payload(self, payload: str) -> int:
        """``notify`` for a NOTIFY payload; a malformed payload wakes nobody."""
        key = parse_payload(payload)
        if key is None:
            log.warning("ignoring malformed %s payload %r", COMMANDS_CHANNEL, payload[:200])
            return 0
        return self.notify(*key)

    def wake_all(self) -> int:
        """Signal every waiter (they re-query); returns how many."""
        self.sequence += 1
        woken = 0
        for subscriptions in self._waiting.values():
            for subscription in subscriptions:
                subscription.signal()
            woken += len(subscriptions)
        return woken


class PendingCommandsSource(Protocol):
    async def pending_commands(self, customer_id: str, environment_id: str) -> PendingCommands:
        """Due pending commands of one environment; raises when the database is down."""
        ...


@dataclass(frozen=True, slots=True)
class _Query:
    """A pending-commands query in flight, shared by the polls that join it."""

    sequence: int
    """``CommandSignals.sequence`` when it started."""
    started: float
    """The poller's clock when it started."""
    task: asyncio.Task[PendingCommands]


@dataclass(frozen=True, slots=True)
class CommandPoller:
    """Answers long polls: read-only on the database, woken by ``signals``."""

    repository: PendingCommandsSource
    signals: CommandSignals
    clock: Callable[[], float] = field(default=time.monotonic)
    uniform: Callable[[float, float], float] = field(default=random.uniform)
    deliveries: CommandDeliveries | None = None
    """Measures command delivery latency on each reply with commands; None: not measured."""
    _queries: dict[EnvironmentKey, _Query] = field(default_factory=dict, init=False, repr=False)

    async def poll(
        self,
        customer_id: str,
        environment_id: str,
        wait_s: float,
        taken: frozenset[int] = frozenset(),
    ) -> CommandsReply:
        """The environment's due commands, as soon as there are some, or none after ``wait_s``.

        Commands whose id is in ``taken`` (the agent took them already, and their
        results are on the way) are not offered again: with nothing else due the
        poll is held as if there were none, instead of answering at once with a
        re-offer the agent ignores and polling again, until the results apply.

        Queries once, then again only when the environment's notification arrives
        (or all waiters are woken), or when a held-back command becomes due, until
        commands exist, the deadline passes or the signals are closed (shutdown: the
        agent's next poll reaches another instance). ``next_poll_s`` is 0 with
        commands, else ``next_poll_delay()``. Database errors propagate.
        """
        opened = self.clock()
        deadline = opened + wait_s
        key = (customer_id, environment_id)
        with self.signals.subscribe(customer_id, environment_id) as subscription:
            while True:
                subscription.clear()
                query = self._query(key, self.signals.sequence)
                pending = await asyncio.shield(query.task)
                offered = [i for i, c in enumerate(pending.commands) if c.id not in taken]
                if offered:
                    commands = [pending.commands[i] for i in offered]
                    if self.deliveries is not None:
                        # The due ages were taken when the query ran: add the time since.
                        # (A repository that gives none gives none for any command.)
                        now = self.clock()
                        ages = pending.due_for_s
                        self.deliveries.handed_out(
                            commands,
                            [ages[i] + (now - query.started) for i in offered if i < len(ages)],
                            now - opened,
                        )
                    return CommandsReply(commands=commands, next_poll_s=0)
                remaining = deadline - self.clock()
                if remaining <= 0 or self.signals.closed:
                    break
                timeout = remaining
                if pending.next_due_in_s is not None:
                    timeout = min(remaining, max(pending.next_due_in_s, MIN_RECHECK_S))
                # Timing out at the deadline needs no last query: nothing signalled.
                if not await subscription.wait(timeout) and timeout == remaining:
                    break
        return CommandsReply(commands=[], next_poll_s=next_poll_delay(self.uniform))

    def _query(self, key: EnvironmentKey, needed: int) -> _Query:
        """A query of ``key``'s pending commands started at sequence ``needed`` or later.

        Joins the one in flight when it qualifies; else starts one. The task
        outlives a poll that stops waiting (shielded), so the others still get it.
        """
        query = self._queries.get(key)
        if query is not None and query.sequence >= needed:
            return query
        task = asyncio.ensure_future(self.repository.pending_commands(*key))
        query = _Query(self.signals.sequence, self.clock(), task)
        self._queries[key] = query

        def done(finished: asyncio.Task[PendingCommands]) -> None:
            if self._queries.get(key) is query:
                del self._queries[key]
            # Retrieved here, so an error no poll awaited any more is not logged
            # as never retrieved; every poll that awaits it gets it raised.
            if not finished.cancelled():
                finished.exception()

        task.add_done_callback(done)
        return query

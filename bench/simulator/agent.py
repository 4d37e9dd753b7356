"""One simulated agent: the I/O loops around ``state``, ``events`` and ``sender``.

Five tasks per agent, all on the shared event loop:

* sender: the only task that POSTs events, one batch at a time, so batches (and
  seq numbers within a boot) reach the edge in order even across retries;
* heartbeat: a heartbeat every ``heartbeat_s`` (plus or minus 20 %);
* poll: ``GET /v1/commands?wait=...&taken=...`` in a loop, admitting commands by the rules;
* worker: applies admitted commands one at a time and reports each result;
* probe: follows sampled accepted events to ``applied``/``rejected``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pydantic import ValidationError

from bench.simulator.config import SAMPLE_EVERY, SimConfig
from bench.simulator.events import Event, EventFactory
from bench.simulator.retry import RetryPolicy, TransientError, Verdict, parse_retry_after, verdict
from bench.simulator.sender import BatchSender, RefusedError, Sent, problem_text, should_log
from bench.simulator.state import AgentState, Decision, run_command
from bench.simulator.stats import Stats
from bench.simulator.transport import NETWORK_ERRORS, Reply, Transport
from services.shared.commands import Command, CommandsReply
from services.shared.events import MAX_EVENTS_PER_BATCH
from services.shared.identity import AgentIdentity

log = logging.getLogger(__name__)

COMMANDS_PATH: Final = "/v1/commands"
POLL_GRACE_S: Final = 15.0
"""Added to the long-poll wait for the request timeout: the server holds the poll
up to ``wait`` seconds, and a loaded edge may answer a little after that."""
BROKEN_POLL_PAUSE_S: Final = 5.0
"""Pause after a poll answer that is a bug (e.g. 404 while the route does not exist
yet), so a broken route costs one request per agent per few seconds, not a storm."""
MIN_EARLY_PAUSE_S: Final = 0.5
"""Floor for the pause after an early empty reply, so ``next_poll_s`` = 0 from a
server that does not hold polls cannot turn into a busy loop."""
APPLY_DELAY_S: Final = (0.05, 0.5)
PROBE_FIRST_S: Final = 0.1
PROBE_MAX_S: Final = 1.0
SAMPLE_TIMEOUT_S: Final = 120.0
STATUS_TIMEOUT_S: Final = 10.0
MAX_BATCH_BYTES: Final = 512 * 1024


def _json_size(event: Event) -> int:
    return len(json.dumps(event, separators=(",", ":")))


def pause_after_poll(
    reply: CommandsReply, elapsed_s: float, wait_s: float, new_commands: int
) -> float:
    """Seconds to wait before the next poll.

    New commands to apply: poll again at once (more may be queued behind them).
    Otherwise follow the server's ``next_poll_s``, which it jitters so that agents
    whose polls ended together (a deadline, a restart) come back spread out. A
    reply that came early with nothing new (the server did not hold the poll, or
    re-offered commands whose results it has not recorded yet) waits at least
    MIN_EARLY_PAUSE_S: the API lists a command as pending until the controller
    settles its result, and polling again at once would spin on the re-offer.
    """
    if new_commands > 0:
        return 0.0
    held = not reply.commands and wait_s > 0 and elapsed_s >= 0.9 * wait_s
    return reply.next_poll_s if held else max(reply.next_poll_s, MIN_EARLY_PAUSE_S)


@dataclass
class _Sample:
    accepted_at: float
    due_at: float
    delay_s: float


class SimAgent:
    """One agent identity with its own transport, boot and simulated resources."""

    def __init__(
        self,
        identity: AgentIdentity,
        config: SimConfig,
        transport: Transport,
        stats: Stats,
        rng: random.Random,
        *,
        policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self._config = config
        self._transport = transport
        self._stats = stats
        self._rng = rng
        self._policy = policy or RetryPolicy()
        self._clock = clock
        self.label = f"{identity.customer_id}/{identity.environment_id}/{identity.agent_id}"
        self.state = AgentState.with_initial_resources(config.resources, rng)
        self.events = EventFactory()
        # None marks the end: ``stop`` puts it last, and the send loop ends there.
        self._outbox: asyncio.Queue[Event | None] = asyncio.Queue()
        self._loops: list[asyncio.Task[None]] = []
        self._stopped = False
        self._to_apply: asyncio.Queue[Command] = asyncio.Queue()
        self._samples: dict[str, _Sample] = {}
        self._sample_added = asyncio.Event()
        self._sender = BatchSender(transport, stats, self._policy, clock=clock, label=self.label)

    async def run(self) -> None:
        """Run until cancelled or stopped; a crash in one loop ends this agent, logged, counted."""
        if self._stopped:
            return
        self._stats.agents_running += 1
        # The first batch: full state, then a heartbeat, as a real agent does on boot.
        self._outbox.put_nowait(self.events.observed_state(self.state.observed()))
        self._outbox.put_nowait(self.events.heartbeat())
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._send_loop())
                # A child cancelled on its own (``stop``) ends without ending the group.
                self._loops = [
                    group.create_task(self._heartbeat_loop()),
                    group.create_task(self._poll_loop()),
                    group.create_task(self._apply_loop()),
                    group.create_task(self._probe_loop()),
                ]
        except* Exception as crashed:
            for error in crashed.exceptions:
                self._stats.error(f"agent:{type(error).__name__}")
                log.error("%s: agent stopped: %r", self.label, error)
        finally:
            self._stats.agents_running -= 1

    def stop(self) -> None:
        """Make no new events, stop polling, and let the send loop finish what is queued.

        ``run`` returns once every queued event was accepted (or refused as a
        bug): a stopping agent abandons no batch as long as the edge answers. A
        caller that cannot wait cancels ``run``'s task, which counts the batch in
        flight as abandoned.
        """
        self._stopped = True
        for task in self._loops:
            task.cancel()
        self._outbox.put_nowait(None)

    # --- events ---------------------------------------------------------------

    async def _send_loop(self) -> None:
        carry: Event | None = None
        ending = False
        while not ending:
            first = carry if carry is not None else await self._outbox.get()
            if first is None:
                return
            batch = [first]
            carry = None
            size = _json_size(first)
            # Coalesce what queued up meanwhile (during a retry, say) into one batch,
            # within the contract's count and well under the edge's 1 MiB body limit;
            # the batch is fixed from here on, retries resend exactly it.
            while len(batch) < MAX_EVENTS_PER_BATCH and not self._outbox.empty():
                event = self._outbox.get_nowait()
                if event is None:
                    ending = True
                    break
                if size + _json_size(event) > MAX_BATCH_BYTES:
                    carry = event
                    break
                batch.append(event)
                size += _json_size(event)
            if await self._sender.send(batch) is Sent.ACCEPTED:
                self._track_samples(batch)

    async def _heartbeat_loop(self) -> None:
        while True:
            # Jitter keeps agents started together from beating together forever.
            await asyncio.sleep(self._config.heartbeat_s * self._rng.uniform(0.8, 1.2))
            self._outbox.put_nowait(self.events.heartbeat())

    # --- commands -------------------------------------------------------------

    async def _poll_loop(self) -> None:
        wait_s = self._config.poll_wait_s
        retrying = self._policy.retrying(self._count_poll_retry)
        while True:
            started = self._clock()
            try:
                reply: CommandsReply = await retrying(self._poll_once)
            except RefusedError as refused:
                if should_log(self._stats, refused.kind):
                    log.warning(
                        "%s: poll refused (%s): %s",
                        self.label,
                        refused.kind,
                        problem_text(refused.body),
                    )
                await asyncio.sleep(BROKEN_POLL_PAUSE_S * self._rng.uniform(0.8, 1.2))
                continue
            taken = self.offer(reply.commands)
            elapsed_s = self._clock() - started
            await asyncio.sleep(pause_after_poll(reply, elapsed_s, wait_s, taken))

    def offer(self, commands: list[Command]) -> int:
        """Admit offered commands in server order, queue those to apply, return how many."""
        taken = 0
        for command in commands:
            self._stats.commands["delivered"] += 1
            decision = self.state.admit(command)
            if decision is Decision.APPLY:
                self._stats.saw_epoch(command.epoch)
                self._to_apply.put_nowait(command)
                taken += 1
            elif decision is Decision.STALE_EPOCH:
                self._stats.commands["stale_epoch_ignored"] += 1
            else:
                self._stats.commands["duplicate_ignored"] += 1
        return taken

    async def _poll_once(self) -> CommandsReply:
        wait_s = self._config.poll_wait_s
        path = f"{COMMANDS_PATH}?wait={wait_s}"
        taken = self.state.latest_taken()
        if taken:
            # Commands already taken are not offered again: the poll waits for new ones.
            path += "&taken=" + ",".join(map(str, taken))
        try:
            reply = await self._transport.request("GET", path, timeout_s=wait_s + POLL_GRACE_S)
        except NETWORK_ERRORS as error:
            kind = f"commands:{type(error).__name__}"
            self._stats.error(kind)
            raise TransientError(kind) from error
        decided = verdict(reply.status)
        if decided is not Verdict.DONE:
            kind = f"commands:{reply.status}"
            self._stats.error(kind)
            if decided is Verdict.RETRY:
                raise TransientError(kind, parse_retry_after(reply.retry_after))
            raise RefusedError(kind, reply.body)
        try:
            return CommandsReply.model_validate_json(reply.body)
        except ValidationError as error:
            kind = "commands:invalid_reply"
            self._stats.error(kind)
            raise RefusedError(kind, str(error).encode()) from error

    async def _apply_loop(self) -> None:
        while True:
            command = await self._to_apply.get()
            await asyncio.sleep(self._rng.uniform(*APPLY_DELAY_S))
            failing = self._rng.random() < self._config.fail_ratio
            outcome, message = run_command(self.state, command, simulate_failure=failing)
            self._stats.commands["applied" if outcome == "succeeded" else "failed"] += 1
            self._outbox.put_nowait(
                self.events.command_result(command.id, command.epoch, outcome, message)
            )
            self._outbox.put_nowait(self.events.observed_state(self.state.observed()))

    def _count_poll_retry(self, _state: object) -> None:
        self._stats.poll_retries += 1

    # --- accept -> applied latency ----------------------------------------------

    def _track_samples(self, batch: list[Event]) -> None:
        now = self._clock()
        for event in batch:
            if self._rng.random() < 1.0 / SAMPLE_EVERY:
                self._stats.samples_tracked += 1
                self._samples[event["id"]] = _Sample(now, now + PROBE_FIRST_S, PROBE_FIRST_S)
                self._sample_added.set()

    async def _probe_loop(self) -> None:
        while True:
            # Any sample added after this point wakes the wait below, so a new
            # sample's first check is not held up behind an older, backed-off one.
            self._sample_added.clear()
            if not self._samples:
                # No timer while there is nothing to follow: with thousands of
                # agents, idle wake-ups would cost real CPU.
                await self._sample_added.wait()
                continue
            due = min(sample.due_at for sample in self._samples.values())
            delay = due - self._clock()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._sample_added.wait(), delay)
                    continue
                except TimeoutError:
                    pass
            for event_id, sample in list(self._samples.items()):
                if sample.due_at <= self._clock():
                    await self._probe(event_id, sample)

    async def _probe(self, event_id: str, sample: _Sample) -> None:
        try:
            reply = await self._transport.request(
                "GET", f"/v1/events/{event_id}", timeout_s=STATUS_TIMEOUT_S
            )
            status = self._status_of(reply)
        except NETWORK_ERRORS as error:
            self._stats.error(f"status:{type(error).__name__}")
            status = "pending"
        now = self._clock()
        if status in ("applied", "rejected"):
            del self._samples[event_id]
            self._stats.sample_done(now, status, now - sample.accepted_at)
        elif status == "dropped" or now - sample.accepted_at > SAMPLE_TIMEOUT_S:
            del self._samples[event_id]
            if status != "dropped":
                self._stats.samples_timed_out += 1
        else:
            # Back off gently: the first checks are close together for resolution on
            # fast applies, later ones sparse so a lagging controller is not flooded.
            sample.delay_s = min(sample.delay_s * 1.5, PROBE_MAX_S)
            sample.due_at = now + sample.delay_s

    def _status_of(self, reply: Reply) -> str:
        """applied / rejected / pending, or dropped when the answer is a bug."""
        decided = verdict(reply.status)
        if decided is not Verdict.DONE:
            kind = f"status:{reply.status}"
            self._stats.error(kind)
            if decided is Verdict.BUG:
                if should_log(self._stats, kind):
                    log.warning(
                        "%s: status lookup refused: %s", self.label, problem_text(reply.body)
                    )
                return "dropped"
            return "pending"
        try:
            status = json.loads(reply.body)["status"]
        except (ValueError, KeyError, TypeError):
            self._stats.error("status:invalid_reply")
            return "dropped"
        return status if status in ("applied", "rejected") else "pending"

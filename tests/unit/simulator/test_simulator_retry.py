"""Which answers are retried, how long the waits are, and that retries resend the same ids."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import aiohttp
import pytest

from bench.simulator.events import EventFactory
from bench.simulator.retry import RetryPolicy, Verdict, parse_retry_after, verdict
from bench.simulator.sender import BatchSender, Sent
from bench.simulator.stats import Stats
from bench.simulator.transport import Reply

from .fakes import RecordingSleep, ScriptedTransport, accepted


@pytest.mark.parametrize("status", [200, 202])
def test_success_is_done(status: int) -> None:
    assert verdict(status) is Verdict.DONE


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(status: int) -> None:
    assert verdict(status) is Verdict.RETRY


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 415, 422, 431, 501])
def test_other_statuses_are_bugs_not_retried(status: int) -> None:
    assert verdict(status) is Verdict.BUG


def test_retry_after_seconds_and_dates() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None
    # A silly value is capped rather than parking the agent for a day.
    assert parse_retry_after("86400") == 300.0


def _sender(transport: ScriptedTransport, sleep: RecordingSleep) -> tuple[BatchSender, Stats]:
    stats = Stats(0.0)
    policy = RetryPolicy(multiplier_s=0.01, max_s=0.05, sleep=sleep)
    return BatchSender(transport, stats, policy, clock=lambda: 1.0), stats


async def test_503_then_202_resends_the_same_batch_and_ids() -> None:
    transport = ScriptedTransport([Reply(503, b"{}", "1"), accepted()])
    sleep = RecordingSleep()
    sender, stats = _sender(transport, sleep)
    factory = EventFactory()
    batch = [factory.heartbeat(), factory.heartbeat(), factory.heartbeat()]

    assert await sender.send(batch) is Sent.ACCEPTED

    assert len(transport.calls) == 2
    first, second = transport.calls
    assert first.event_ids() == second.event_ids() == [e["id"] for e in batch]
    assert first.body == second.body
    # Retry-After is a floor under the (here tiny) jittered backoff.
    assert sleep.delays == [pytest.approx(1.0)]
    assert stats.events_accepted == 3
    assert stats.batches_accepted == 1
    assert stats.retries == 1
    assert stats.errors == {"events:503": 1}


async def test_network_errors_and_429_are_retried_until_accepted() -> None:
    transport = ScriptedTransport(
        [
            aiohttp.ClientConnectionError("reset"),
            TimeoutError(),
            Reply(429, b"{}", None),
            Reply(502, b"{}", None),
            accepted(),
        ]
    )
    sleep = RecordingSleep()
    sender, stats = _sender(transport, sleep)
    batch = [EventFactory().heartbeat()]

    assert await sender.send(batch) is Sent.ACCEPTED

    assert len({tuple(call.event_ids()) for call in transport.calls}) == 1
    assert len(transport.calls) == 5
    assert all(0 <= delay <= 0.05 for delay in sleep.delays)
    assert stats.errors == {
        "events:ClientConnectionError": 1,
        "events:TimeoutError": 1,
        "events:429": 1,
        "events:502": 1,
    }


@pytest.mark.parametrize("status", [400, 401, 413, 422])
async def test_client_errors_are_counted_and_not_retried(status: int) -> None:
    transport = ScriptedTransport([Reply(status, b'{"title": "nope"}'), accepted()])
    sleep = RecordingSleep()
    sender, stats = _sender(transport, sleep)

    assert await sender.send([EventFactory().heartbeat()]) is Sent.REFUSED

    assert len(transport.calls) == 1
    assert sleep.delays == []
    assert stats.errors == {f"events:{status}": 1}
    assert stats.refused_events == 1
    assert stats.events_accepted == 0


async def test_cancelling_a_retrying_send_counts_an_abandoned_batch() -> None:
    transport = ScriptedTransport(handler=lambda *_: Reply(503, b"{}", "0"))

    backing_off = asyncio.Event()

    async def slow_sleep(_seconds: float) -> None:
        backing_off.set()
        await asyncio.sleep(3600)

    stats = Stats(0.0)
    sender = BatchSender(transport, stats, RetryPolicy(sleep=slow_sleep))
    task = asyncio.create_task(sender.send([EventFactory().heartbeat()]))
    await asyncio.wait_for(backing_off.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stats.abandoned_batches == 1

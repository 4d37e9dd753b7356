"""Polling for an outcome with a deadline, instead of sleeping a guessed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    until: Callable[[T], bool],
    *,
    timeout_s: float = 30.0,
    interval_s: float = 0.2,
    what: str = "condition",
) -> T:
    """Call ``probe`` until ``until(result)`` holds; raise AssertionError at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if until(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s; last: {result!r}")
        await asyncio.sleep(interval_s)


async def until(
    condition: Callable[[], bool], *, timeout_s: float = 5.0, what: str = "condition"
) -> None:
    """Let the event loop run until ``condition()`` holds; AssertionError at the deadline.

    For state in this process (a task reached its wait, a list grew): the
    condition is checked about every millisecond.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.001)

"""Sleeps in services/ and tests/: each one is on this list with its reason, or marked.

A sleep that stands in for waiting on a condition makes a test slow when it is
long and flaky when it is short: wait on the condition instead
(``tests.support.waiting.until`` for state in the process, ``eventually`` for a
probe). A sleep that is the point (pacing, letting time pass to show nothing
happens, a retry interval inside a loop that checks its own condition) is listed
here with why, or carries ``# sleep-ok: <why>`` on its line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]

RETRY: Final = "retry interval of a loop that checks its own condition and deadline"
PACING: Final = "pacing: sending at a set rate is the point"
NOTHING: Final = "lets time pass to show that nothing happens in it"
LOAD: Final = "keeps load running for a while: the time is the point"
YIELD: Final = "yields to the event loop once"
FAKE: Final = "a fake's sleep inside a unit test"

# path -> {the call's line, stripped: why}
ALLOWED: Final[dict[str, dict[str, str]]] = {
    "services/controller/__main__.py": {
        "await asyncio.sleep(args.watch)": "--watch refreshes the status every N seconds",
    },
    "services/controller/partitions.py": {
        "await asyncio.sleep(settle_s)": "lets in-flight writes reach the log end (runbook step)",
        "await asyncio.sleep(wait_s)": "gives producers time to learn the new partitions",
    },
    "services/controller/retention.py": {
        "await asyncio.sleep(0)  # let the apply agent in between chunks": YIELD,
    },
    "services/shared/topics.py": {"await asyncio.sleep(0.2)": RETRY},
    "tests/chaos/test_failover.py": {
        "await asyncio.sleep(2)  # the survivor keeps applying under load": LOAD,
        "await asyncio.sleep(2)": LOAD,
        "await asyncio.sleep(1)": LOAD,
        "await asyncio.sleep(1.5)": NOTHING + " (the stopping controller stays alive)",
    },
    "tests/chaos/test_partitions.py": {
        "await asyncio.sleep(2)": LOAD,
        "await asyncio.sleep(1)": NOTHING + " (no offset skipped)",
    },
    "tests/e2e/test_dashboards.py": {"await asyncio.sleep(1)": PACING},
    "tests/e2e/test_make_run.py": {
        "time.sleep(2)": RETRY,
    },
    "tests/integration/test_agent_identity.py": {
        "await asyncio.sleep(0.05)": RETRY,
        "await asyncio.sleep(0.1)": RETRY,
    },
    "tests/integration/test_commands.py": {
        "await asyncio.sleep(1)": NOTHING + " (no further command appears)",
    },
    "tests/integration/test_edge_limits.py": {
        "await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))": PACING,
    },
    "tests/integration/test_edge_waf.py": {
        "await asyncio.sleep(max(0.0, next_at - time.monotonic()))": PACING,
        "await asyncio.sleep(0.5)": RETRY + " (Kafka back-pressure)",
    },
    "tests/integration/test_kafka_outage.py": {"await asyncio.sleep(0.5)": RETRY},
    "tests/integration/test_ownership.py": {"await asyncio.sleep(2)": LOAD},
    "tests/integration/test_tenant_isolation.py": {
        "await asyncio.sleep(2)": NOTHING + " (a change that was refused is never applied)",
        "await asyncio.sleep(2)  # longer than the edge's cache of the certificate check": (
            "outlives the edge's cache: the time is the point"
        ),
        'await asyncio.sleep(float(reply.headers.get("Retry-After", "1")))': "honours Retry-After",
    },
    "tests/support/load.py": {
        "await asyncio.sleep(0.2)": RETRY + " (back-pressure)",
        "await asyncio.sleep(pause_s)": PACING,
        "await asyncio.sleep(self.pause_s)": PACING,
        "await asyncio.sleep(0.2 if status == 503 else 1.0)": RETRY + " (back-pressure)",
    },
    "tests/support/edge_probe.py": {"time.sleep(0.1)": RETRY},
    "tests/support/processes.py": {"time.sleep(0.25)": RETRY},
    "tests/support/waiting.py": {
        "await asyncio.sleep(interval_s)": RETRY,
        "await asyncio.sleep(0.001)": RETRY,
    },
    "tests/unit/api/test_api_commands_app.py": {"await asyncio.sleep(0.1)": NOTHING},
    "tests/unit/shared/test_notify.py": {
        "await asyncio.sleep(0.05)": NOTHING,
    },
    "tests/unit/simulator/fakes.py": {"await asyncio.sleep(0)": FAKE},
    "tests/unit/simulator/test_simulator_agent.py": {"await asyncio.sleep(0.2)": NOTHING},
    "tests/unit/simulator/test_simulator_retry.py": {"await asyncio.sleep(3600)": FAKE},
}
MARK: Final = "# sleep-ok:"


def sleeps() -> Iterator[tuple[str, str]]:
    """(path, stripped line) of every call named ``sleep`` under services/ and tests/."""
    for top in ("services", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            source = path.read_text()
            if "sleep" not in source:
                continue
            lines = source.splitlines()
            for node in ast.walk(ast.parse(source)):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name == "sleep":
                    yield path.relative_to(ROOT).as_posix(), lines[node.lineno - 1].strip()


def test_every_sleep_is_listed_with_its_reason_or_marked() -> None:
    found = list(sleeps())
    assert len(found) > 20  # the walk sees the tree
    unlisted = [
        f"{path}: {line}"
        for path, line in found
        if MARK not in line and line not in ALLOWED.get(path, {})
    ]
    assert unlisted == [], "wait on the condition, or list the sleep with why"


def test_the_list_names_only_sleeps_that_exist() -> None:
    found = set(sleeps())
    stale = [(p, line) for p, lines in ALLOWED.items() for line in lines if (p, line) not in found]
    assert stale == []

"""Simulator settings and the deterministic mapping of agent numbers to identities."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from services.shared.identity import AgentIdentity

SAMPLE_EVERY: Final = 20
"""One accepted event in this many is followed to applied/rejected for latency."""


@dataclass(frozen=True)
class SimConfig:
    agents: int = 20
    customers: int = 4
    environments_per_customer: int = 2
    edge_url: str = "https://127.0.0.1:18443"
    pki_dir: Path = Path(".run/pki")
    duration_s: float | None = None
    heartbeat_s: float = 5.0
    poll_wait_s: int = 20
    """Whole seconds: the API accepts ``wait`` only as an integer."""
    resources: int = 3
    fail_ratio: float = 0.0
    ramp_s: float = 2.0
    report: Path | None = None
    live: bool = True
    seed: int | None = None
    controller_metrics: tuple[str, ...] = field(default_factory=tuple)
    controller_status: tuple[str, ...] = field(default_factory=tuple)
    cert_lifetime_s: float = 24 * 3600
    """Lifetime of the agents' first certificates; each agent renews at about 2/3 of it."""

    def identities(self) -> Iterator[AgentIdentity]:
        """Yield one identity per agent: ``cust-<i>/env-<j>/agent-<k>``.

        Agents are dealt round-robin over customers first and then over each
        customer's environments, so every customer (and so every Kafka partition
        key) gets load even with few agents. ``k`` is the agent's global number,
        which keeps agent ids unique without a per-environment counter.
        """
        for k in range(self.agents):
            customer = k % self.customers
            environment = (k // self.customers) % self.environments_per_customer
            yield AgentIdentity(f"cust-{customer}", f"env-{environment}", f"agent-{k}")

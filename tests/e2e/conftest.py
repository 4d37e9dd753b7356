"""Fixtures of the end-to-end tests: the native Prometheus and Alertmanager of one test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Final

import pytest

from tests.support.deployment import Deployment
from tests.support.monitoring import Monitoring, WebhookReceiver

# Controller ports Prometheus scrapes: a test may start this many, one after another.
CONTROLLERS_EVER: Final = 4


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    """Alertmanager's webhook receiver, recording every notification."""
    webhook = await WebhookReceiver().start()
    yield webhook
    await webhook.close()


@pytest.fixture
def monitoring(deployment: Deployment, receiver: WebhookReceiver) -> Iterator[Monitoring]:
    """Prometheus and Alertmanager scraping this deployment's processes (test timings)."""
    base = deployment.fleet.stack.controller_base_port
    ports = range(base, base + CONTROLLERS_EVER)
    started = Monitoring(deployment.fleet.stack, deployment.fleet.name, ports, receiver.url)
    yield started.start()
    started.stop()

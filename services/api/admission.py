"""The API's lanes of bounded in-flight work (services/shared/admission.py).

Three lanes, each with its own limit per API process:

* ``events``: ``POST /v1/events``, the accept path. Each holds a Kafka
  acknowledgement (a few milliseconds when the broker keeps up); more in flight
  than this only queues behind the event loop and the producer, so the excess
  waits for a slot in arrival order instead, up to ``queue_s``.
* ``poll``: ``GET /v1/commands``, the long poll. A poll waits up to 25 s on a
  condition and costs nothing meanwhile, so its limit is the fleet's size, and
  a thousand open polls never take an event accept's place.
* ``other``: the rest of the agent and operator routes (event status, desired
  state, listings), which read PostgreSQL through a bounded pool; waits like
  ``events``.

Health, readiness, metrics and the OpenAPI document are never counted nor
refused: a shedding process must still answer its probes.

A request that finds no slot within ``queue_s`` (or more than ``max_waiting``
already waiting) is answered 503 with Retry-After and a problem body. The edge
bounds the requests it sends to each API too (infra/nginx/edge.conf.template),
above what a process admits and lets wait, so the process decides.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.shared.admission import Admission, LaneLimit

UNCOUNTED_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})


class AdmissionSettings(BaseSettings):
    """Per-process limits of requests in flight, from ``FLEETPLANE_API_ADMISSION_*``."""

    model_config = SettingsConfigDict(
        env_prefix="FLEETPLANE_API_ADMISSION_", frozen=True, extra="ignore"
    )

    events: int = Field(default=64, ge=1)
    """``POST /v1/events`` in flight at once; more wait for a slot."""
    poll: int = Field(default=5000, ge=1)
    """Long polls (``GET /v1/commands``) held at once; more get 503 at once."""
    other: int = Field(default=64, ge=1)
    """Every other counted route in flight at once; more wait for a slot."""
    queue_s: float = Field(default=5.0, ge=0, le=10)
    """Longest wait for a slot (events and other) before 503; well under the edge's
    10 s read timeout, so a shed request is answered, never timed out."""
    max_waiting: int = Field(default=512, ge=0)
    """Most requests waiting per lane (events and other); more get 503 at once."""
    retry_after_s: int = Field(default=1, ge=1, le=60)
    """``Retry-After`` of a shed answer."""


def lane(request: web.Request) -> str | None:
    """The lane of ``request``, or None for the probes that are never refused."""
    path = request.path
    if path == "/v1/events" and request.method == "POST":
        return "events"
    if path == "/v1/commands":
        return "poll"
    if path in UNCOUNTED_PATHS:
        return None
    return "other"


def admission(settings: AdmissionSettings | None = None) -> Admission:
    """The API's admission control; reads ``FLEETPLANE_API_ADMISSION_*`` when not given."""
    limits = settings or AdmissionSettings()

    def waiting(limit: int) -> LaneLimit:
        return LaneLimit(limit, limits.queue_s, limits.max_waiting)

    return Admission(
        lane,
        {"events": waiting(limits.events), "poll": limits.poll, "other": waiting(limits.other)},
        retry_after_s=limits.retry_after_s,
    )

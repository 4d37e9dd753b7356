"""The API's collectors, built from the shared metric specs into the app's own registry."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.shared import metrics as specs
from services.shared.events import EVENT_TYPES


@dataclass(frozen=True, slots=True)
class ApiMetrics:
    registry: CollectorRegistry
    requests: Counter
    request_duration: Histogram
    events_accepted: Counter
    batches_refused: Counter
    produce_duration: Histogram
    kafka_unavailable: Counter
    revocation_delay: Histogram
    certificate_checks: Counter
    command_delivery: Histogram
    database_pool: Gauge
    long_polls_waiting: Gauge
    # events_accepted's child per event type, bound once: labels() per event
    # would look the child up again for each.
    accepted_by_type: dict[str, Counter] = field(default_factory=dict)

    def count_accepted(self, types: Iterable[str]) -> None:
        """Count accepted events by type."""
        for event_type, count in Tally(types).items():
            self.accepted_by_type[event_type].inc(count)

    @classmethod
    def create(cls) -> ApiMetrics:
        """Collectors in a fresh registry, so several apps can share one process."""
        registry = CollectorRegistry(auto_describe=True)
        events_accepted = specs.counter(registry, specs.API_EVENTS_ACCEPTED)
        return cls(
            registry=registry,
            requests=specs.counter(registry, specs.API_REQUESTS),
            request_duration=specs.histogram(registry, specs.API_REQUEST_DURATION),
            events_accepted=events_accepted,
            batches_refused=specs.counter(registry, specs.API_BATCHES_REFUSED),
            produce_duration=specs.histogram(registry, specs.API_PRODUCE_DURATION),
            kafka_unavailable=specs.counter(registry, specs.API_KAFKA_UNAVAILABLE),
            revocation_delay=specs.histogram(registry, specs.IDENTITY_REVOCATION_DELAY),
            certificate_checks=specs.counter(registry, specs.CERTIFICATE_CHECKS),
            command_delivery=specs.histogram(registry, specs.API_COMMAND_DELIVERY),
            database_pool=specs.gauge(registry, specs.DATABASE_POOL_CONNECTIONS),
            long_polls_waiting=specs.gauge(registry, specs.API_LONG_POLLS_WAITING),
            accepted_by_type={t: events_accepted.labels(type=t) for t in EVENT_TYPES},
        )

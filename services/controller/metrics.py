"""The controller's collectors, built from the shared metric list."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from services.shared import metrics as m


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.events_applied = m.counter(self.registry, m.CONTROLLER_EVENTS_APPLIED)
        self.duplicates = m.counter(self.registry, m.CONTROLLER_DUPLICATES)
        self.apply_duration = m.histogram(self.registry, m.CONTROLLER_BATCH_DURATION)
        self.batch_size = m.histogram(self.registry, m.CONTROLLER_BATCH_SIZE)
        self.dead_letters = m.counter(self.registry, m.CONTROLLER_DEAD_LETTERS)
        self.fenced_writes = m.counter(self.registry, m.CONTROLLER_FENCED_WRITES)
        self.database_retries = m.counter(self.registry, m.CONTROLLER_DATABASE_RETRIES)
        self.rebalances = m.counter(self.registry, m.CONTROLLER_REBALANCES)
        self.owned_partitions = m.gauge(self.registry, m.CONTROLLER_OWNED_PARTITIONS)
        self.resync_requests = m.counter(self.registry, m.CONTROLLER_RESYNC_REQUESTS)
        self.partition_lag = m.gauge(self.registry, m.CONTROLLER_PARTITION_LAG)
        self.oldest_pending_age = m.gauge(self.registry, m.CONTROLLER_OLDEST_PENDING_AGE)
        self.accept_to_applied = m.histogram(self.registry, m.CONTROLLER_ACCEPT_TO_APPLIED)
        self.database_pool = m.gauge(self.registry, m.DATABASE_POOL_CONNECTIONS)
        self.environments = m.gauge(self.registry, m.ENVIRONMENTS_BY_LIVENESS)
        self.records_pruned = m.counter(self.registry, m.CONTROLLER_RECORDS_PRUNED)

"""The closed list of Fleetplane's metric names.

Every metric any service exports is declared here once, with its type, unit and
meaning, so dashboards, alerts and code agree. Services build their collectors
from these specs into a registry of their own (no process-global registry, so
several apps can live in one test process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

Kind = Literal["counter", "gauge", "histogram"]

LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SIZE_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    kind: Kind
    unit: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = LATENCY_BUCKETS


# --- API -------------------------------------------------------------------------
API_REQUESTS: Final = MetricSpec(
    "fleetplane_api_requests_total",
    "counter",
    "requests",
    "HTTP requests answered by the API, by route template, method and status.",
    ("route", "method", "status"),
)
API_REQUEST_DURATION: Final = MetricSpec(
    "fleetplane_api_request_duration_seconds",
    "histogram",
    "seconds",
    "Time from request received to response ready, by route template and method.",
    ("route", "method"),
)
API_EVENTS_ACCEPTED: Final = MetricSpec(
    "fleetplane_api_events_accepted_total",
    "counter",
    "events",
    "Agent events acknowledged by Kafka and answered 202, by event type.",
    ("type",),
)
API_BATCHES_REFUSED: Final = MetricSpec(
    "fleetplane_api_batches_refused_total",
    "counter",
    "batches",
    "Event batches refused before producing anything, by reason.",
    ("reason",),
)
API_PRODUCE_DURATION: Final = MetricSpec(
    "fleetplane_api_produce_duration_seconds",
    "histogram",
    "seconds",
    "Time for Kafka to acknowledge every event of one batch.",
)
API_KAFKA_UNAVAILABLE: Final = MetricSpec(
    "fleetplane_api_kafka_unavailable_total",
    "counter",
    "batches",
    "Batches answered 503 because Kafka did not acknowledge in time.",
)

# --- Controller ------------------------------------------------------------------
CONTROLLER_EVENTS_APPLIED: Final = MetricSpec(
    "fleetplane_controller_events_applied_total",
    "counter",
    "events",
    "Agent events recorded in PostgreSQL, by type and outcome (applied or rejected).",
    ("type", "status"),
)
CONTROLLER_DUPLICATES: Final = MetricSpec(
    "fleetplane_controller_duplicates_skipped_total",
    "counter",
    "events",
    "Redelivered records skipped: offset already applied or event id already recorded.",
)
CONTROLLER_BATCH_DURATION: Final = MetricSpec(
    "fleetplane_controller_apply_duration_seconds",
    "histogram",
    "seconds",
    "Time to apply one batch to PostgreSQL, including the fence check and commit.",
)
CONTROLLER_BATCH_SIZE: Final = MetricSpec(
    "fleetplane_controller_batch_size",
    "histogram",
    "records",
    "Records per applied batch.",
    buckets=SIZE_BUCKETS,
)
CONTROLLER_DEAD_LETTERS: Final = MetricSpec(
    "fleetplane_controller_dead_letters_total",
    "counter",
    "records",
    "Poison records sent to the dead-letter topic, by reason.",
    ("reason",),
)
CONTROLLER_FENCED_WRITES: Final = MetricSpec(
    "fleetplane_controller_fenced_writes_total",
    "counter",
    "transactions",
    "Apply transactions refused because this controller's epoch was no longer current.",
)
CONTROLLER_DATABASE_RETRIES: Final = MetricSpec(
    "fleetplane_controller_database_retries_total",
    "counter",
    "attempts",
    "Apply attempts that failed on a database error and were retried (back-pressure).",
)
CONTROLLER_REBALANCES: Final = MetricSpec(
    "fleetplane_controller_rebalances_total",
    "counter",
    "rebalances",
    "Partition assignments received from the consumer group.",
)
CONTROLLER_OWNED_PARTITIONS: Final = MetricSpec(
    "fleetplane_controller_owned_partitions",
    "gauge",
    "partitions",
    "Partitions this controller currently owns with a valid epoch.",
)
CONTROLLER_RESYNC_REQUESTS: Final = MetricSpec(
    "fleetplane_controller_resync_requests_total",
    "counter",
    "requests",
    "Full-state resyncs requested from agents, by reason (new_boot, sequence_gap).",
    ("reason",),
)
CONTROLLER_PARTITION_LAG: Final = MetricSpec(
    "fleetplane_controller_partition_lag",
    "gauge",
    "records",
    "Records of an owned partition not applied yet: Kafka's log end minus the stored "
    "next offset, by partition. Only the owner exports a partition.",
    ("partition",),
)
CONTROLLER_OLDEST_PENDING_AGE: Final = MetricSpec(
    "fleetplane_controller_oldest_pending_age_seconds",
    "gauge",
    "seconds",
    "Age of the oldest record of an owned partition that exists (log end beyond the "
    "stored offset) but is not applied: its Kafka timestamp once fetched, else since it "
    "was first seen pending; 0 when nothing waits. Rises without bound on a stall. "
    "Only the owner exports a partition.",
    ("partition",),
)
CONTROLLER_RECORDS_PRUNED: Final = MetricSpec(
    "fleetplane_controller_records_pruned_total",
    "counter",
    "records",
    "Event records (deduplication keys) pruned from owned partitions after the retention window.",
)
CONTROLLER_REFUSED_PARTITIONS: Final = MetricSpec(
    "fleetplane_controller_refused_partitions",
    "gauge",
    "partitions",
    "Partitions assigned to this controller that it refuses to apply because their "
    "stored offset is below Kafka's log start (records deleted before they were applied).",
)

# --- gateway_auth and agent identity ---------------------------------------------
GATEWAY_AUTH_REQUESTS: Final = MetricSpec(
    "fleetplane_gateway_auth_requests_total",
    "counter",
    "requests",
    "HTTP requests answered by gateway_auth, by route template, method and status.",
    ("route", "method", "status"),
)
GATEWAY_AUTH_CERTIFICATES_ISSUED: Final = MetricSpec(
    "fleetplane_gateway_auth_certificates_issued_total",
    "counter",
    "certificates",
    "Agent certificates issued, by path (enrollment, renewal).",
    ("via",),
)
GATEWAY_AUTH_REFUSALS: Final = MetricSpec(
    "fleetplane_gateway_auth_refusals_total",
    "counter",
    "requests",
    "Enrollments, renewals and edge checks refused, by problem type (weak-key, "
    "enrollment-token-used, revoked, ...).",
    ("reason",),
)
CERTIFICATE_CHECKS: Final = MetricSpec(
    "fleetplane_certificate_checks_total",
    "counter",
    "checks",
    "Per-request agent certificate checks (revocation, issuing CA, names), by outcome "
    "(allowed, refused): the API on every agent request, gateway_auth on renewals.",
    ("outcome",),
)
IDENTITY_REVOCATION_DELAY: Final = MetricSpec(
    "fleetplane_identity_revocation_enforcement_delay_seconds",
    "histogram",
    "seconds",
    "Time from a revocation's revoked_at to the first request of a certificate it covers "
    "that was refused, by where: request (the per-request check in the API, or "
    "gateway_auth's on a renewal) or longpoll (an open long poll ended by the API). "
    "Measured once per certificate and process.",
    ("where",),
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30),
)

# --- Backups (services/backup) --------------------------------------------------
BACKUP_LAST_SUCCESS: Final = MetricSpec(
    "fleetplane_backup_last_success_timestamp_seconds",
    "gauge",
    "seconds",
    "Unix time the newest complete backup in the bucket finished (read from its manifest).",
)
BACKUP_DURATION: Final = MetricSpec(
    "fleetplane_backup_duration_seconds",
    "gauge",
    "seconds",
    "Time the newest complete backup took, from snapshot to manifest.",
)
BACKUP_SIZE: Final = MetricSpec(
    "fleetplane_backup_size_bytes",
    "gauge",
    "bytes",
    "Size of the newest complete backup's object (compressed and encrypted).",
)
BACKUP_FAILURES: Final = MetricSpec(
    "fleetplane_backup_failures_total",
    "counter",
    "runs",
    "Scheduled runs that failed, by verb (backup, verify, prune).",
    ("verb",),
)
BACKUP_LAST_VERIFIED: Final = MetricSpec(
    "fleetplane_backup_last_verified_timestamp_seconds",
    "gauge",
    "seconds",
    "Unix time the newest backup that passed verification finished; alert when it is old.",
)

CERTIFICATE_EXPIRY: Final = MetricSpec(
    "fleetplane_certificate_expiry_timestamp_seconds",
    "gauge",
    "seconds",
    "Unix time a certificate of the platform's PKI stops being valid (its notAfter), by "
    "certificate: edge-server, internal-server, internal-ca, issuing-ca, root-ca. "
    "Exported by gateway_auth, read from the PKI folder at each scrape.",
    ("certificate",),
)

CONTROLLER_ACCEPT_TO_APPLIED: Final = MetricSpec(
    "fleetplane_controller_accept_to_applied_seconds",
    "histogram",
    "seconds",
    "Time from the API's accepted_at stamp on an agent event to the commit of the "
    "transaction that applied (or rejected) it, observed once per event after the commit.",
)
GATEWAY_AUTH_REQUEST_DURATION: Final = MetricSpec(
    "fleetplane_gateway_auth_request_duration_seconds",
    "histogram",
    "seconds",
    "Time from request received to response ready in gateway_auth (the edge's per-request "
    "check included), by route template and method.",
    ("route", "method"),
)

DATABASE_POOL_CONNECTIONS: Final = MetricSpec(
    "fleetplane_database_pool_connections",
    "gauge",
    "connections",
    "The process's PostgreSQL connection pool at scrape time, by state: in_use (checked "
    "out), idle (open, in the pool), max (the most it may open). Exported by the controller, "
    "the API and gateway_auth alike: the scrape job tells the services apart.",
    ("state",),
)

API_LONG_POLLS_WAITING: Final = MetricSpec(
    "fleetplane_api_long_polls_waiting",
    "gauge",
    "polls",
    "Command long polls waiting in this API process at scrape time (subscribed to their "
    "environment's NOTIFY wake-ups).",
    (),
)

ENVIRONMENTS_BY_LIVENESS: Final = MetricSpec(
    "fleetplane_environments",
    "gauge",
    "environments",
    "Environments by customer and liveness (connected, unknown, lost, never_seen), derived "
    "from the last heartbeat's age. Exported by the controller that owns the customer's "
    "partition, so each customer is counted once; every state is exported, 0 included. "
    "Low volume (customers x 4): the one series with a customer label.",
    ("customer", "liveness"),
)

COMMAND_DELIVERY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600,
)  # fmt: skip
API_COMMAND_DELIVERY: Final = MetricSpec(
    "fleetplane_api_command_delivery_seconds",
    "histogram",
    "seconds",
    "Time from the moment a command offer became due (the not_before of its current "
    "attempt) to the moment a long poll of this API process first handed that offer to an "
    "agent, observed once per (command id, attempt) and process. became_due says whether "
    "the offer became due while that poll was already waiting (during_poll: the platform's "
    "own delay, NOTIFY to reply) or before the poll arrived (before_poll: includes the "
    "agent's time between polls or offline).",
    ("became_due",),
    buckets=COMMAND_DELIVERY_BUCKETS,
)

ALL_METRICS: Final = (
    API_REQUESTS,
    API_REQUEST_DURATION,
    API_EVENTS_ACCEPTED,
    API_BATCHES_REFUSED,
    API_PRODUCE_DURATION,
    API_KAFKA_UNAVAILABLE,
    CONTROLLER_EVENTS_APPLIED,
    CONTROLLER_DUPLICATES,
    CONTROLLER_BATCH_DURATION,
    CONTROLLER_BATCH_SIZE,
    CONTROLLER_DEAD_LETTERS,
    CONTROLLER_FENCED_WRITES,
    CONTROLLER_DATABASE_RETRIES,
    CONTROLLER_REBALANCES,
    CONTROLLER_OWNED_PARTITIONS,
    CONTROLLER_RESYNC_REQUESTS,
    CONTROLLER_PARTITION_LAG,
    CONTROLLER_OLDEST_PENDING_AGE,
    CONTROLLER_RECORDS_PRUNED,
    CONTROLLER_REFUSED_PARTITIONS,
    GATEWAY_AUTH_REQUESTS,
    GATEWAY_AUTH_CERTIFICATES_ISSUED,
    GATEWAY_AUTH_REFUSALS,
    CERTIFICATE_CHECKS,
    IDENTITY_REVOCATION_DELAY,
    BACKUP_LAST_SUCCESS,
    BACKUP_DURATION,
    BACKUP_SIZE,
    BACKUP_FAILURES,
    BACKUP_LAST_VERIFIED,
    CERTIFICATE_EXPIRY,
    CONTROLLER_ACCEPT_TO_APPLIED,
    GATEWAY_AUTH_REQUEST_DURATION,
    DATABASE_POOL_CONNECTIONS,
    API_LONG_POLLS_WAITING,
    ENVIRONMENTS_BY_LIVENESS,
    API_COMMAND_DELIVERY,
)


def _check(spec: MetricSpec, kind: Kind) -> None:
    if spec not in ALL_METRICS:
        raise ValueError(f"metric {spec.name} is not in the shared list")
    if spec.kind != kind:
        raise TypeError(f"metric {spec.name} is a {spec.kind}, not a {kind}")


def counter(registry: CollectorRegistry, spec: MetricSpec) -> Counter:
    _check(spec, "counter")
    # prometheus_client appends _total itself.
    return Counter(spec.name.removesuffix("_total"), spec.help, spec.labels, registry=registry)


def gauge(registry: CollectorRegistry, spec: MetricSpec) -> Gauge:
    _check(spec, "gauge")
    return Gauge(spec.name, spec.help, spec.labels, registry=registry)


def histogram(registry: CollectorRegistry, spec: MetricSpec) -> Histogram:
    _check(spec, "histogram")
    return Histogram(spec.name, spec.help, spec.labels, registry=registry, buckets=spec.buckets)

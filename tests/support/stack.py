"""Where the native stack listens, and per-test isolation on it.

The stack (Kafka, PostgreSQL, nginx) is started by ``make test`` through
``infra/local/stack.sh``; tests never start or stop it. Each test module gets
its own topics, consumer group and database, cloned from a migrated template, so
tests cannot see each other's data.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_fixed

from services.shared.migrate import upgrade
from services.shared.settings import DatabaseSettings

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_DATABASE = "fleetplane_test_template"


@dataclass(frozen=True)
class Stack:
    run_dir: Path = Path(os.environ.get("FLEETPLANE_RUN_DIR", ROOT / ".run"))
    kafka_bootstrap: str = os.environ.get("FLEETPLANE_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    # The same variables as infra/local/lib.sh, so tests can run on a second stack.
    edge_url: str = f"https://127.0.0.1:{os.environ.get('FLEETPLANE_EDGE_PORT', '18443')}"
    operator_url: str = f"https://127.0.0.1:{os.environ.get('FLEETPLANE_OPERATOR_PORT', '18444')}"
    enroll_url: str = f"https://127.0.0.1:{os.environ.get('FLEETPLANE_ENROLL_PORT', '18445')}"
    gateway_auth_port: int = int(os.environ.get("FLEETPLANE_GATEWAY_AUTH_PORT", "18083"))
    api_ports: tuple[int, ...] = tuple(
        int(p) for p in os.environ.get("FLEETPLANE_API_PORTS", "18081 18082").split()
    )
    controller_base_port: int = int(os.environ.get("FLEETPLANE_TEST_CONTROLLER_BASE_PORT", "18091"))

    @property
    def pki_dir(self) -> Path:
        return Path(os.environ.get("FLEETPLANE_PKI_DIR", self.run_dir / "pki"))

    @property
    def pki_offline_dir(self) -> Path:
        """The root CA's folder (infra/local/lib.sh PKI_OFFLINE_DIR); no service reads it."""
        return Path(os.environ.get("FLEETPLANE_PKI_OFFLINE_DIR", self.run_dir / "pki-offline"))

    def admin_dsn(self, dbname: str = "postgres") -> str:
        d = self.database
        return (
            f"host={d.database_host} port={d.database_port} dbname={dbname} "
            f"user={d.database_user} password={d.database_password.get_secret_value()}"
        )


def prepare_template(stack: Stack) -> None:
    """(Re)create the migrated template database that test databases are cloned from."""
    with psycopg.connect(stack.admin_dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(TEMPLATE_DATABASE)
            )
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DATABASE)))
    upgrade(stack.database.model_copy(update={"database_name": TEMPLATE_DATABASE}))


def clone_database(stack: Stack, name: str) -> None:
    with psycopg.connect(stack.admin_dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DATABASE)
            )
        )


@retry(
    # FORCE terminates the database's sessions, but refuses one still logging in
    # (it has no role yet, "must be a member of the role whose process is being
    # terminated"): a process stopped a moment ago may have been reconnecting.
    retry=retry_if_exception_type(psycopg.errors.InsufficientPrivilege),
    wait=wait_fixed(0.2),
    stop=stop_after_attempt(10),
    reraise=True,
)
def drop_database(stack: Stack, name: str) -> None:
    with psycopg.connect(stack.admin_dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@dataclass(frozen=True)
class FleetEnv:
    """One isolated deployment on the shared stack: its topics, group and database."""

    stack: Stack
    name: str
    partitions: int

    @classmethod
    def new(cls, stack: Stack, partitions: int = 4) -> FleetEnv:
        return cls(stack, f"t{uuid.uuid4().hex[:10]}", partitions)

    @property
    def events_topic(self) -> str:
        return f"{self.name}.events"

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.name}.events.dlq"

    @property
    def identity_topic(self) -> str:
        return f"{self.name}.identity"

    @property
    def database_name(self) -> str:
        return f"fleetplane_{self.name}"

    @property
    def database(self) -> DatabaseSettings:
        return self.stack.database.model_copy(update={"database_name": self.database_name})

    def service_env(self) -> dict[str, str]:
        """Environment for API and controller processes of this deployment."""
        env = dict(os.environ)
        env.update(
            {
                "FLEETPLANE_KAFKA_BOOTSTRAP": self.stack.kafka_bootstrap,
                "FLEETPLANE_EVENTS_TOPIC": self.events_topic,
                "FLEETPLANE_DEAD_LETTER_TOPIC": self.dead_letter_topic,
                "FLEETPLANE_IDENTITY_TOPIC": self.identity_topic,
                "FLEETPLANE_TOPIC_PARTITIONS": str(self.partitions),
                "FLEETPLANE_DATABASE_NAME": self.database_name,
                "FLEETPLANE_CONTROLLER_GROUP_ID": f"{self.name}-controllers",
                "FLEETPLANE_CONTROLLER_DATA_DIR": str(self.stack.run_dir / "test-controllers"),
                "FLEETPLANE_PKI_DIR": str(self.stack.pki_dir),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

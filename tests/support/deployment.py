"""A Fleetplane deployment for one test: API and controller processes on a FleetEnv."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from services.gateway_auth.operator_keys import create as create_operator_key
from services.shared.topics import delete_topics, ensure_journal_topic, ensure_topics
from tests.support.processes import ServiceProcess
from tests.support.stack import FleetEnv, clone_database, drop_database
from tests.support.waiting import eventually


class Deployment:
    """Owns every process it starts; ``close`` stops them and drops the test's data."""

    def __init__(self, fleet: FleetEnv, log_dir: Path) -> None:
        self.fleet = fleet
        self.log_dir = log_dir
        self.apis: dict[int, ServiceProcess] = {}
        self.gateway_auth: ServiceProcess | None = None
        self.controllers: dict[str, ServiceProcess] = {}
        self._next_controller_port = fleet.stack.controller_base_port

    def create(self) -> Deployment:
        clone_database(self.fleet.stack, self.fleet.database_name)
        asyncio.run(
            ensure_topics(
                self.fleet.stack.kafka_bootstrap,
                {self.fleet.events_topic: self.fleet.partitions, self.fleet.dead_letter_topic: 1},
            )
        )
        asyncio.run(
            ensure_journal_topic(self.fleet.stack.kafka_bootstrap, self.fleet.identity_topic)
        )
        return self

    def api_ssl_context(self) -> ssl.SSLContext:
        """Trusts the API's server certificate; presents no client certificate."""
        context = ssl.create_default_context(
            cafile=str(self.fleet.stack.pki_dir / "internal-ca.pem")
        )
        context.check_hostname = False
        return context

    async def api_metric(self, name: str, *, sample: str = "", **labels: str) -> float:
        """The sum of ``name``'s values on the running APIs' /metrics whose labels include
        ``labels`` (0 when absent); a counter's ``_created`` timestamps are not values.
        ``sample`` picks one series of a histogram (``_count``, ``_sum``)."""
        total = 0.0
        for port in self.apis:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=self.api_ssl_context())
                ) as session,
                session.get(f"https://127.0.0.1:{port}/metrics") as reply,
            ):
                assert reply.status == 200, await reply.text()
                text = await reply.text()
            for family in text_string_to_metric_families(text):
                if family.name == name:
                    total += sum(
                        found.value
                        for found in family.samples
                        if not found.name.endswith("_created")
                        and (not sample or found.name == name + sample)
                        and labels.items() <= found.labels.items()
                    )
        return total

    async def until_long_polls_wait(self, count: int = 1) -> None:
        """Return once the APIs hold ``count`` waiting long polls (subscribed to wake-ups)."""
        await eventually(
            lambda: self.api_metric("fleetplane_api_long_polls_waiting"),
            lambda waiting: waiting >= count,
            timeout_s=10,
            interval_s=0.05,
            what=f"{count} long poll(s) waiting in the APIs",
        )

    def start_gateway_auth(self, extra_env: dict[str, str] | None = None) -> ServiceProcess:
        """Start gateway_auth on the stack's port (enrollment, renewal, revocations)."""
        port = self.fleet.stack.gateway_auth_port
        process = ServiceProcess(
            name="gateway-auth",
            args=["-m", "services.gateway_auth", "--port", str(port)],
            env={**self.fleet.service_env(), **(extra_env or {})},
            health_url=f"https://127.0.0.1:{port}/readyz",
            log_path=self.log_dir / "gateway-auth.log",
            ssl_context=self.api_ssl_context(),
        ).start()
        self.gateway_auth = process
        return process

    def stop_gateway_auth(self) -> None:
        if self.gateway_auth is not None:
            self.gateway_auth.stop()
            self.gateway_auth = None

    def start_api(self, port: int, extra_env: dict[str, str] | None = None) -> ServiceProcess:
        """Start an API instance (and gateway_auth, which the edge needs, unless running)."""
        if self.gateway_auth is None:
            self.start_gateway_auth()
        process = ServiceProcess(
            name=f"api-{port}",
            args=["-m", "services.api", "--port", str(port)],
            env={**self.fleet.service_env(), **(extra_env or {})},
            health_url=f"https://127.0.0.1:{port}/readyz",
            log_path=self.log_dir / f"api-{port}.log",
            ssl_context=self.api_ssl_context(),
        ).start()
        self.apis[port] = process
        return process

    def start_apis(self, extra_env: dict[str, str] | None = None) -> None:
        for port in self.fleet.stack.api_ports:
            self.start_api(port, extra_env)

    def operator_key(self, customer_id: str | None) -> str:
        """A new operator key for one customer (or all when None), stored in this deployment."""
        return create_operator_key(
            self.fleet.stack.admin_dsn(self.fleet.database_name), "test", customer_id
        )

    def start_controller(
        self,
        name: str | None = None,
        *,
        wait_ready: bool = True,
        extra_env: dict[str, str] | None = None,
        wait: bool = True,
        module: str = "services.controller",
    ) -> ServiceProcess:
        """Start a controller and wait until ready (or healthy), or not at all (``wait=False``).

        ``module``: what ``python -m`` runs; tests pass one that wraps the controller.
        """
        name = name or f"controller-{len(self.controllers) + 1}"
        port = self._next_controller_port
        self._next_controller_port += 1
        process = ServiceProcess(
            name=name,
            args=[
                "-m",
                module,
                "--web-port",
                str(port),
                "--instance-id",
                f"{self.fleet.name}-{name}",
                # e.g. debug, to see aiokafka's and faust's side of a failing test.
                "--loglevel",
                os.environ.get("FLEETPLANE_TEST_CONTROLLER_LOGLEVEL", "info"),
            ],
            env={**self.fleet.service_env(), **(extra_env or {})},
            health_url=f"http://127.0.0.1:{port}/healthz",
            log_path=self.log_dir / f"{name}.log",
        )
        process.start(ready_path="/readyz" if wait_ready else None, wait=wait)
        self.controllers[name] = process
        return process

    def close(self) -> None:
        for process in [*self.controllers.values(), *self.apis.values()]:
            process.stop()
        self.stop_gateway_auth()
        drop_database(self.fleet.stack, self.fleet.database_name)
        asyncio.run(
            delete_topics(
                self.fleet.stack.kafka_bootstrap,
                [self.fleet.events_topic, self.fleet.dead_letter_topic, self.fleet.identity_topic],
            )
        )

"""Schema-driven fuzzing of the agent API through the real edge.

Cases are generated from the API's own OpenAPI document (``build_openapi``),
positive (valid by the schema) and negative (each violating it somewhere), for
every agent route, and sent through nginx's agent listener with valid client
certificates. Every answer must be documented: no 5xx, a status the operation
lists, the documented media type, headers and body schema; valid input is
accepted and invalid input refused with a 4xx.

Rate limits: the edge limits each certificate identity (10 r/s, burst 40 by
default), and a 429 from the edge is not part of the API's document (the API
never answers it itself). The cases are spread round-robin over several agent
identities so the run stays well under every identity's limit; a 429 would
fail the run as an undocumented answer rather than being waved through.

Long polls: a valid ``GET /v1/commands`` waits up to ``wait`` seconds while
the environment has no due commands. The polling environment is given pending
commands first (an operator's desired state, applied by a real controller) whose
deadline outlasts the run, and the fuzzer's events come from agents of another
environment, so nothing they report (command results with small, valid ids,
observed states) can settle or supersede those commands: every valid poll answers
at once.

Applied: the controller keeps running throughout. Every event answered 202 is
recorded by the end, nothing is on the dead-letter topic and every partition's
lag is 0: the schema admits only what PostgreSQL can store.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from pydantic import TypeAdapter, ValidationError
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.api.openapi import OPERATIONS, build_openapi
from services.gateway_auth.ca import CertificateAuthority
from services.gateway_auth.pki import write_agent_certificate
from services.shared.commands import MAX_WAIT_S
from services.shared.events import EventId
from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.drain import assert_drained
from tests.support.invariants import Ledger, check
from tests.support.operators import OperatorClient
from tests.support.stack import Stack

AnyCase = schemathesis.Case[Any]
CUSTOMER = "fuzz-co"
ENVIRONMENT = "fuzz-env"
EVENTS_ENVIRONMENT = "fuzz-events"
"""Where the fuzzed events come from: not the polling environment (module doc)."""
IDENTITIES = 8
"""Agents per environment the cases are spread over: ~30 requests/s in all stays far
below 8 x 10 r/s."""
ACK_TIMEOUT_S = "3600"
"""The controller's command deadline: seeded commands stay due for the whole run."""
MIN_CASES = 1000
# Examples asked of Hypothesis per (operation, mode). It stops early once it has
# tried every distinct input of a small space (the ``wait`` query: 27), so the
# total run is asserted separately against MIN_CASES. Generating an event batch
# costs about 0.1 s of CPU (nested unions, patterns), far more than sending it;
# the budget favours the cheap GET cases to keep the run near a minute and a half.
BUDGET: dict[tuple[str, GenerationMode], int] = {
    ("post_events", GenerationMode.POSITIVE): 250,
    ("post_events", GenerationMode.NEGATIVE): 250,
    ("get_event", GenerationMode.POSITIVE): 200,
    ("get_event", GenerationMode.NEGATIVE): 200,
    ("get_commands", GenerationMode.POSITIVE): 120,
    ("get_commands", GenerationMode.NEGATIVE): 130,
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    positive_data_acceptance,
]
SEEDED = [
    {"kind": "deployment", "name": "web", "version": "2.0.0"},
    {"kind": "job", "name": "migrate", "version": "1.0.0"},
]
REQUEST_TIMEOUT_S = 15


@dataclass
class FuzzRun:
    """What the fuzzer sent and saw; failures are collected, not raised, to see them all."""

    sessions: list[requests.Session]
    """Agents of the polling environment: every case but event batches."""
    event_sessions: list[tuple[str, requests.Session]]
    """(agent id, session) of the events environment: event batches."""
    edge_url: str
    ca_file: str
    """The root the edge's server certificate chains to (passed per call: schemathesis
    sets ``verify`` on every request, which overrides the session's)."""
    turn: Iterator[int] = field(default_factory=itertools.count)
    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    valid_as_sent: Counter[str] = field(default_factory=Counter)
    """Negative cases whose invalid part did not survive serialisation (see below)."""
    ledger: Ledger = field(default_factory=Ledger)
    """Every event answered 202."""

    def send(self, case: AnyCase, label: str) -> None:
        number = next(self.turn)
        agent_id = None
        if label.startswith("post_events/"):
            agent_id, session = self.event_sessions[number % len(self.event_sessions)]
        else:
            session = self.sessions[number % len(self.sessions)]
        response = case.call(
            base_url=self.edge_url, session=session, verify=self.ca_file, timeout=REQUEST_TIMEOUT_S
        )
        if agent_id is not None and response.status_code == 202:
            body = response.request.body
            assert isinstance(body, bytes | str), body
            sent = json.loads(body)
            self.ledger.record(CUSTOMER, EVENTS_ENVIRONMENT, agent_id, sent["events"])
        self.cases[label] += 1
        self.statuses[(label, response.status_code)] += 1
        checks = CHECKS
        if label.endswith("/negative") and valid_as_sent(response.request.url or ""):
            # e.g. ``wait: []`` or ``wait: {}``: requests drops the parameter, so
            # what went out is a valid poll, and its 200 is right.
            self.valid_as_sent[label] += 1
            checks = [c for c in CHECKS if c is not negative_data_rejection]
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as group:
            curl = case.as_curl_command(base_url=self.edge_url)
            reasons = "; ".join(sorted({f"{f.title}: {f.message}"[:400] for f in group.exceptions}))
            self.failures.append(f"{label} -> {response.status_code}: {reasons}\n    {curl[:600]}")


EVENT_ID = TypeAdapter(EventId)


def valid_as_sent(url: str) -> bool:
    """Whether the GET request that went out is valid, whatever the case meant to send.

    Schemathesis builds negative cases from values of the wrong type; some of them
    serialise to nothing (an empty list or object as a query parameter) or to a
    valid value, so the request sent is a valid one.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if parts.path == "/v1/commands":
        return not query or (
            len(query) == 1
            and query[0][0] == "wait"
            and query[0][1].isascii()
            and query[0][1].isdigit()
            and int(query[0][1]) <= MAX_WAIT_S
        )
    event_id = parts.path.removeprefix("/v1/events/")
    if event_id == parts.path or query:
        return False
    try:
        EVENT_ID.validate_python(unquote(event_id))
    except ValidationError:
        return False
    return True


def agent_session(cert: Path, key: Path) -> requests.Session:
    session = requests.Session()
    session.cert = (str(cert), str(key))
    return session


async def seed_pending_commands(
    deployment: Deployment, agent: AgentClient, operator: OperatorClient, ledger: Ledger
) -> None:
    """Give the polling environment due commands that outlast the run (module doc)."""
    deployment.start_controller(
        extra_env={"FLEETPLANE_CONTROLLER_COMMAND_ACK_TIMEOUT_S": ACK_TIMEOUT_S}
    )
    heartbeat = agent.heartbeat()
    status, body = await agent.post_events([heartbeat])
    assert status == 202, body
    ledger.record(CUSTOMER, ENVIRONMENT, agent.agent_id, [heartbeat])
    status, body = await operator.set_desired(CUSTOMER, ENVIRONMENT, 1, SEEDED)
    assert status == 202, body
    status, reply = await agent.poll_commands(20)
    assert status == 200, reply
    assert len(reply["commands"]) == len(SEEDED), reply


def unique_event_ids(case: AnyCase) -> bool:
    body: Any = case.body
    ids = [event["id"] for event in body["events"]]
    return len(ids) == len(set(ids))


def run_operation(
    run: FuzzRun, schema: Any, name: str, mode: GenerationMode, examples: int
) -> None:
    operation = next(o for o in OPERATIONS if o.name == name)
    api_operation = schema[operation.path][operation.method]
    label = f"{name}/{mode.value}"
    strategy = api_operation.as_strategy(generation_mode=mode)
    if name == "post_events" and mode is GenerationMode.POSITIVE:
        # The one documented rule JSON Schema cannot state (openapi.py): unique event
        # ids within a batch. Without it, a "valid" batch may rightly get 422.
        strategy = strategy.filter(unique_event_ids)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=strategy)
    def fuzz(case: AnyCase) -> None:
        run.send(case, label)

    fuzz()


@pytest.mark.timeout(240)
async def test_agent_api_answers_only_what_its_schema_documents(
    deployment: Deployment,
    stack: Stack,
    issuing_ca: CertificateAuthority,
    tmp_path: Path,
    agents: Callable[[str, str, str], AgentClient],
) -> None:
    deployment.start_apis()
    operator = OperatorClient(stack.pki_dir, deployment.operator_key(CUSTOMER), stack.operator_url)
    seeder = agents(CUSTOMER, ENVIRONMENT, "fuzz-seeder")
    ledger = Ledger()
    await seed_pending_commands(deployment, seeder, operator, ledger)
    sessions = []
    event_sessions = []
    for n in range(IDENTITIES):
        cert, key = write_agent_certificate(
            issuing_ca, tmp_path / f"fuzz-{n}", CUSTOMER, ENVIRONMENT, f"fuzz-agent-{n}"
        )
        sessions.append(agent_session(cert, key))
        agent_id = f"fuzz-reporter-{n}"
        cert, key = write_agent_certificate(
            issuing_ca, tmp_path / f"fuzz-events-{n}", CUSTOMER, EVENTS_ENVIRONMENT, agent_id
        )
        event_sessions.append((agent_id, agent_session(cert, key)))
    schema = schemathesis.openapi.from_dict(build_openapi())
    run = FuzzRun(
        sessions, event_sessions, stack.edge_url, str(stack.pki_dir / "root-ca.pem"), ledger=ledger
    )
    try:
        assert {name for name, _ in BUDGET} == {o.name for o in OPERATIONS if o.audience == "agent"}
        for (name, mode), examples in BUDGET.items():
            # Blocking requests: off the event loop the fixtures' sessions live on.
            await asyncio.to_thread(run_operation, run, schema, name, mode, examples)
    finally:
        for session in [*sessions, *(s for _, s in event_sessions)]:
            session.close()

    total = sum(run.cases.values())
    summary = (
        f"{total} cases {dict(run.cases)}; statuses {dict(sorted(run.statuses.items()))}; "
        f"negative cases valid as sent {dict(run.valid_as_sent)}; "
        f"{len(run.ledger)} events answered 202"
    )
    print(summary)
    assert not run.failures, f"{len(run.failures)} answers outside the schema ({summary}):\n" + (
        "\n".join(run.failures[:40])
    )
    assert total >= MIN_CASES, summary
    # Every operation was reached with valid input and answered with its success status.
    for operation in (o for o in OPERATIONS if o.audience == "agent"):
        label = f"{operation.name}/{GenerationMode.POSITIVE.value}"
        assert run.statuses[(label, operation.status)] > 0, summary
    assert all(api.alive() for api in deployment.apis.values())
    # Every 202 applied: recorded once, nothing dead-lettered, nothing left behind.
    # (Fuzzed sequence numbers are arbitrary: stale ones are recorded as rejected,
    # which the order check would count; only loss and doubling are asserted.)
    await assert_drained(deployment)
    report = check(run.ledger, stack.admin_dsn(deployment.fleet.database_name))
    assert not report.lost, report
    assert not report.duplicated, report
    assert report.recorded == report.accepted, report
    assert run.statuses[("post_events/positive", 202)] > 0, summary
    assert all(controller.alive() for controller in deployment.controllers.values())

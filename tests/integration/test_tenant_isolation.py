"""Tenant isolation matrix: every route, for agent certificates and operator keys,
against another customer's and another environment's ids, through the real edge.

Two customers are seeded with distinctive data (events, observed and desired
state, commands, audit): ``iso-alpha`` with environments ``prod`` and
``alpha-staging``, and ``iso-bravo`` with ``prod`` (the same environment id, so
only the customer tells them apart) and ``bravo-vault``. The callers are the
agent ``iso-alpha/prod/alpha-prod-agent`` and an operator key scoped to
``iso-alpha``.

Each row of ``ROWS`` is one request and what must come of it:

- a refusal (the edge's 404 for a route the caller's listener does not serve,
  the WAF's 403, the API's 404 for a customer outside the key's scope or 422),
  where answers that could tell "exists" from "does not" must equal the answer
  for an id that never existed;
- or a positive control: the caller's own ids work, so a refusal elsewhere is
  not an outage.

Every answer, refused or not, is checked for leaks: neither body nor headers
may contain another tenant's ids or data, except what the caller itself put in
the request. For the agent, "another tenant" is customer ``iso-bravo`` and its
own customer's other environment; operator keys are scoped to a customer
(openapi.py), so for the operator it is ``iso-bravo`` alone, and
``alpha-staging`` is one of its positive controls.

``test_the_matrix_covers_every_route`` derives the routes from the services'
own routers: a new route without a refusal row for each kind of caller, and a
positive control, fails it; gateway_auth's routes count as soon as it serves
any (``route_sources``).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import itertools
import json
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.api import routes as api_routes
from services.gateway_auth.ca import CertificateAuthority
from services.shared.operator_keys import parse_token
from tests.support.agents import AgentClient
from tests.support.deployment import Deployment
from tests.support.operators import OperatorClient
from tests.support.stack import FleetEnv, Stack
from tests.support.waiting import eventually

RouteSetup = Callable[[web.Application], None]
GATEWAY_AUTH_ROUTES = "services.gateway_auth.handlers"


def route_sources() -> dict[str, RouteSetup]:
    """Each HTTP service's route setup, as its app calls it; the matrix covers them all.

    gateway_auth is included as soon as it serves routes, so each of its routes
    needs rows here from then on (its refusals and positive controls, like the
    API's).
    """
    sources: dict[str, RouteSetup] = {"api": api_routes.setup_routes}
    if importlib.util.find_spec(GATEWAY_AUTH_ROUTES) is not None:
        sources["gateway_auth"] = importlib.import_module(GATEWAY_AUTH_ROUTES).setup_routes
    return sources


ALPHA, BRAVO, NOBODY = "iso-alpha", "iso-bravo", "iso-nobody"
"""NOBODY never existed: what a refusal must look like when the target does."""
PROD, ALPHA_OTHER, BRAVO_OTHER = "prod", "alpha-staging", "bravo-vault"
AGENTS = {
    "alpha-prod-agent": (ALPHA, PROD),
    "alpha-staging-agent": (ALPHA, ALPHA_OTHER),
    "bravo-prod-agent": (BRAVO, PROD),
    "bravo-vault-agent": (BRAVO, BRAVO_OTHER),
}
CALLER_AGENT = "alpha-prod-agent"
EDGE_RETRIES = 5
"""All operator requests come from 127.0.0.1, one address for the edge's operator rate
limit: a 429 is waited out (Retry-After) rather than read as the row's answer."""

Caller = Literal["agent", "operator", "enroll", "internal"]
"""``internal``: straight to the route's service, bypassing the edge (public routes only);
``enroll``: the edge's enrollment listener, with no client certificate (an agent enrolling)."""
Target = Literal["own", "own-other-environment", "other-customer", "other-environment"]
Route = tuple[str, str, str]
"""(service, method, path template)"""


def served_routes() -> set[Route]:
    """Every route the services serve (HEAD, which aiohttp adds to each GET, aside)."""
    found: set[Route] = set()
    for service, setup in route_sources().items():
        app = web.Application()
        setup(app)
        for route in app.router.routes():
            if route.method != "HEAD" and route.resource is not None:
                found.add((service, route.method, route.resource.canonical))
    return found


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


@dataclass
class Tenant:
    """What one environment's agent and operator saw while seeding: all of it is its data."""

    customer: str
    environment: str
    agent: AgentClient
    event_ids: list[str] = field(default_factory=list)
    change_id: str = ""
    markers: list[str] = field(default_factory=list)
    """Distinctive strings that exist only in this environment's data."""


@dataclass
class World:
    deployment: Deployment
    tenants: dict[str, Tenant]
    """By agent id."""
    operators: dict[str, OperatorClient]
    """By customer id, each key scoped to that customer."""
    operator_keys: dict[str, str]
    """By customer id: the raw keys of ``operators``."""
    enrollment_tokens: dict[str, str] = field(default_factory=dict)
    """``enrolls`` (used up by the positive row) and ``refused`` (never used up): alpha/prod."""
    sequence: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def me(self) -> Tenant:
        return self.tenants[CALLER_AGENT]

    def tenant(self, customer: str, environment: str) -> Tenant:
        return next(
            t
            for t in self.tenants.values()
            if (t.customer, t.environment) == (customer, environment)
        )

    def foreign(self, caller: Caller) -> list[str]:
        """Strings no answer to ``caller`` may contain (unless the request carried them)."""
        strings = [BRAVO, BRAVO_OTHER, *parse_token(self.operator_keys[BRAVO])]
        for tenant in self.tenants.values():
            if tenant.customer == BRAVO or (
                caller == "agent" and tenant.environment == ALPHA_OTHER
            ):
                strings += [tenant.agent.agent_id, tenant.change_id, *tenant.event_ids]
                strings += tenant.markers
        if caller == "agent":
            strings += [ALPHA_OTHER, *parse_token(self.operator_keys[ALPHA])]
        if caller == "internal":
            strings += [ALPHA, ALPHA_OTHER, *(t.agent.agent_id for t in self.tenants.values())]
        if caller == "enroll":
            strings += [*parse_token(self.operator_keys[ALPHA])]
        return [s for s in strings if s]

    async def send(
        self,
        caller: Caller,
        method: str,
        path: str,
        body: Any = None,
        service: str = "api",
        extra_headers: dict[str, str] | None = None,
    ) -> Reply:
        """One request as ``caller``: the agent with its certificate on the agent
        listener, the operator with its key on the operator listener, an enrolling
        agent on the enrollment listener."""
        stack = self.deployment.fleet.stack
        headers = dict(extra_headers or {})
        if caller == "internal":
            port = stack.gateway_auth_port if service == GATEWAY_AUTH else stack.api_ports[0]
            url = f"https://127.0.0.1:{port}{path}"
            context = self.deployment.api_ssl_context()
        elif caller == "enroll":
            url = f"{stack.enroll_url}{path}"
            context = ssl.create_default_context(cafile=str(stack.pki_dir / "root-ca.pem"))
        elif caller == "agent":
            url = f"{stack.edge_url}{path}"
            context = self.me.agent.ssl_context
        else:
            url = f"{stack.operator_url}{path}"
            context = ssl.create_default_context(cafile=str(stack.pki_dir / "root-ca.pem"))
            headers["Authorization"] = f"Bearer {self.operator_keys[ALPHA]}"
        connector = aiohttp.TCPConnector(ssl=context)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(EDGE_RETRIES):
                async with session.request(method, url, json=body, headers=headers) as answer:
                    reply = Reply(answer.status, dict(answer.headers), await answer.text())
                if reply.status != 429:
                    return reply
                await asyncio.sleep(float(reply.headers.get("Retry-After", "1")))
        return reply


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    route: Route
    caller: Caller
    target: Target
    attempt: str
    request: Callable[[World], Request]
    check: Callable[[World, Request, Reply], Awaitable[None]]
    positive: bool = False

    @property
    def id(self) -> str:
        return f"{self.route[1]} {self.route[2]} | {self.caller} -> {self.target}: {self.attempt}"


def without_request_id(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: v for k, v in body.items() if k != "request_id"}
    return body


def assert_problem(reply: Reply, statuses: set[int]) -> dict[str, Any]:
    assert reply.status in statuses, (reply.status, reply.text)
    assert reply.headers.get("Content-Type", "").startswith("application/problem+json"), reply
    body: dict[str, Any] = reply.json()
    assert body["status"] == reply.status
    return body


def refused(*statuses: int) -> Callable[[World, Request, Reply], Awaitable[None]]:
    async def check(world: World, request: Request, reply: Reply) -> None:
        assert_problem(reply, set(statuses))

    return check


def refused_like_unknown(
    status: int, unknown: Callable[[World], Request]
) -> Callable[[World, Request, Reply], Awaitable[None]]:
    """Refused exactly as a request for ids that never existed is."""

    async def check(world: World, request: Request, reply: Reply) -> None:
        body = assert_problem(reply, {status})
        control = unknown(world)
        baseline = await world.send("operator", control.method, control.path, control.body)
        assert baseline.status == status, baseline
        assert without_request_id(body) == without_request_id(baseline.json())

    return check


# --- requests -------------------------------------------------------------------------


def env_path(customer: str, environment: str, tail: str = "/desired-state") -> str:
    return f"/v1/operator/customers/{customer}/environments/{environment}{tail}"


def desired(customer: str, environment: str) -> Callable[[World], Request]:
    def build(world: World) -> Request:
        # A revision far above the seeded ones, so an applied change would show.
        body = {
            "revision": 1000 + next(world.sequence),
            "resources": [{"kind": "deployment", "name": "intruder", "version": "6.6.6"}],
        }
        return Request("PUT", env_path(customer, environment), body)

    return build


def environments(customer: str) -> Callable[[World], Request]:
    return lambda world: Request("GET", f"/v1/operator/customers/{customer}/environments")


def audit(customer: str) -> Callable[[World], Request]:
    return lambda world: Request("GET", f"/v1/operator/customers/{customer}/audit?limit=50")


# Seeded events: reads look up each tenant's heartbeat; the id-reuse rows reuse its
# observed-state report's id (after which the caller has an event of that id too).
READ, REUSED = 0, 1


def event_of(customer: str, environment: str) -> Callable[[World], Request]:
    return lambda world: Request(
        "GET", f"/v1/events/{world.tenant(customer, environment).event_ids[READ]}"
    )


def batch(world: World, **extra: str) -> dict[str, Any]:
    event = world.me.agent.heartbeat()
    event.update(extra)
    return {"events": [event]}


def reusing_event_id(customer: str, environment: str) -> Callable[[World], Request]:
    def build(world: World) -> Request:
        event = world.me.agent.heartbeat(message="intruder")
        event["id"] = world.tenant(customer, environment).event_ids[REUSED]
        return Request("POST", "/v1/events", {"events": [event]})

    return build


def fixed(method: str, path: str) -> Callable[[World], Request]:
    return lambda world: Request(method, path)


def spoofing(
    build: Callable[[World], Request], customer: str, environment: str
) -> Callable[[World], Request]:
    """``build``'s request with the edge's identity headers naming that tenant's agent."""

    def wrapped(world: World) -> Request:
        request = build(world)
        agent = world.tenant(customer, environment).agent.agent_id
        headers = {
            "X-Fleetplane-Client-DN": f"CN={agent},OU={environment},O={customer}",
            "X-Fleetplane-Client-Verify": "SUCCESS",
            "X-Fleetplane-Listener": "agent",
        }
        return Request(request.method, request.path, request.body, headers)

    return wrapped


# --- checks ---------------------------------------------------------------------------


async def own_event_applied(world: World, request: Request, reply: Reply) -> None:
    assert reply.status == 200, reply
    assert reply.json()["status"] == "applied", reply


async def same_as_never_sent(world: World, request: Request, reply: Reply) -> None:
    """Someone else's event id reads exactly like an id nobody ever sent."""
    assert reply.status == 200, reply
    event_id = request.path.rsplit("/", 1)[1]
    assert reply.json() == {"id": event_id, "status": "pending"}
    never = await world.send("agent", "GET", f"/v1/events/ev-never-{uuid.uuid4().hex}")
    assert never.status == 200
    assert never.json()["status"] == "pending"
    assert never.json().keys() == reply.json().keys()


async def accepted(world: World, request: Request, reply: Reply) -> None:
    assert reply.status == 202, reply
    assert reply.json()["accepted"] == [e["id"] for e in request.body["events"]]


async def accepted_as_own_event(world: World, request: Request, reply: Reply) -> None:
    """An event id that another agent used is this agent's own, separate event."""
    await accepted(world, request, reply)
    event_id = request.body["events"][0]["id"]
    owner = next(t for t in world.tenants.values() if event_id in t.event_ids)
    before = (await owner.agent.event_status(event_id))[1]
    mine = await eventually(
        lambda: world.me.agent.event_status(event_id),
        lambda r: r[1]["status"] == "applied",
        what="the caller's own event with a reused id applied",
    )
    assert mine[1]["applied_at"] != before["applied_at"]
    assert (await owner.agent.event_status(event_id))[1] == before


async def own_commands_only(world: World, request: Request, reply: Reply) -> None:
    assert reply.status == 200, reply
    names = {c["resource"]["name"] for c in reply.json()["commands"]}
    # "intruder": what this operator's own desired-state rows set for this environment.
    assert names, reply.text
    assert names <= {*world.me.markers[1:], "intruder"}, reply.text


async def desired_accepted(world: World, request: Request, reply: Reply) -> None:
    assert reply.status == 202, reply
    assert reply.json()["revision"] == request.body["revision"]


def refused_and_unchanged(customer: str) -> Callable[[World, Request, Reply], Awaitable[None]]:
    """404 like a customer that does not exist, and nothing of the victim's changed."""
    like_unknown = refused_like_unknown(404, desired(NOBODY, PROD))

    async def check(world: World, request: Request, reply: Reply) -> None:
        await like_unknown(world, request, reply)
        # Had the change been produced, the controller would apply it within this wait.
        await asyncio.sleep(2)
        status, body = await world.operators[customer].environments(customer)
        assert status == 200, body
        assert {e["desired_revision"] for e in body["environments"]} == {1}, body

    return check


async def own_environments(world: World, request: Request, reply: Reply) -> None:
    assert reply.status == 200, reply
    listed = [e["environment_id"] for e in reply.json()["environments"]]
    assert listed == sorted([ALPHA_OTHER, PROD]), reply.text


async def own_audit(world: World, request: Request, reply: Reply) -> None:
    assert reply.status == 200, reply
    changes = {e["change_id"] for e in reply.json()["entries"]}
    assert {world.tenant(ALPHA, PROD).change_id, world.tenant(ALPHA, ALPHA_OTHER).change_id} <= (
        changes
    ), reply.text


async def public_answer(world: World, request: Request, reply: Reply) -> None:
    assert reply.status == 200, reply


# --- the matrix -----------------------------------------------------------------------

API = "api"
DESIRED = (
    API,
    "PUT",
    "/v1/operator/customers/{customer_id}/environments/{environment_id}/desired-state",
)
ENVIRONMENTS = (API, "GET", "/v1/operator/customers/{customer_id}/environments")
AUDIT = (API, "GET", "/v1/operator/customers/{customer_id}/audit")
POST_EVENTS = (API, "POST", "/v1/events")
GET_EVENT = (API, "GET", "/v1/events/{event_id}")
COMMANDS = (API, "GET", "/v1/commands")
PUBLIC = [
    (API, "GET", "/healthz"),
    (API, "GET", "/readyz"),
    (API, "GET", "/metrics"),
    (API, "GET", "/openapi.json"),
]
EDGE_404 = refused(404)
# The agent listener's WAF refuses methods and queries outside the agent grammar (403)
# before its routing answers 404 for operator paths.
AGENT_EDGE = refused(403, 404)

ROWS: list[Row] = [
    # POST /v1/events: the identity is the certificate's; a body cannot name another.
    Row(POST_EVENTS, "agent", "own", "a heartbeat",
        lambda w: Request("POST", "/v1/events", batch(w)), accepted, positive=True),
    Row(POST_EVENTS, "agent", "other-customer", "customer and agent ids in the event",
        lambda w: Request("POST", "/v1/events", batch(
            w, customer_id=BRAVO, environment_id=BRAVO_OTHER, agent_id="bravo-vault-agent")),
        refused(422)),
    Row(POST_EVENTS, "agent", "other-environment", "environment id in the event",
        lambda w: Request("POST", "/v1/events", batch(w, environment_id=ALPHA_OTHER)),
        refused(422)),
    Row(POST_EVENTS, "agent", "other-customer", "reuses its event id",
        reusing_event_id(BRAVO, BRAVO_OTHER), accepted_as_own_event),
    Row(POST_EVENTS, "agent", "other-environment", "reuses its event id",
        reusing_event_id(ALPHA, ALPHA_OTHER), accepted_as_own_event),
    Row(POST_EVENTS, "operator", "own", "not served on the operator listener",
        lambda w: Request("POST", "/v1/events", batch(w)), EDGE_404),
    # GET /v1/events/{id}: another agent's id reads like one nobody sent.
    Row(GET_EVENT, "agent", "own", "its own event",
        lambda w: Request("GET", f"/v1/events/{w.me.event_ids[0]}"), own_event_applied,
        positive=True),
    Row(GET_EVENT, "agent", "other-customer", "its event id",
        event_of(BRAVO, BRAVO_OTHER), same_as_never_sent),
    Row(GET_EVENT, "agent", "other-customer", "same environment id, other customer",
        event_of(BRAVO, PROD), same_as_never_sent),
    Row(GET_EVENT, "agent", "other-environment", "its event id",
        event_of(ALPHA, ALPHA_OTHER), same_as_never_sent),
    Row(GET_EVENT, "operator", "other-customer", "not served on the operator listener",
        event_of(BRAVO, BRAVO_OTHER), EDGE_404),
    # GET /v1/commands: only the certificate's environment, whatever the request says.
    Row(COMMANDS, "agent", "own", "its pending commands",
        fixed("GET", "/v1/commands?wait=0"), own_commands_only, positive=True),
    Row(COMMANDS, "agent", "other-customer", "ids in the query",
        fixed("GET", f"/v1/commands?wait=0&customer_id={BRAVO}&environment_id={BRAVO_OTHER}"),
        refused(403)),
    Row(COMMANDS, "agent", "other-environment", "id in the query",
        fixed("GET", f"/v1/commands?wait=0&environment_id={ALPHA_OTHER}"), refused(403)),
    # Identity headers naming the other tenant pass the WAF and reach the API, which
    # sees only what the edge put there: the certificate's identity.
    Row(COMMANDS, "agent", "other-customer", "identity headers naming its agent",
        spoofing(fixed("GET", "/v1/commands?wait=0"), BRAVO, BRAVO_OTHER), own_commands_only),
    Row(COMMANDS, "agent", "other-environment", "identity headers naming its agent",
        spoofing(fixed("GET", "/v1/commands?wait=0"), ALPHA, ALPHA_OTHER), own_commands_only),
    Row(GET_EVENT, "agent", "other-customer", "its event id and identity headers naming it",
        spoofing(event_of(BRAVO, BRAVO_OTHER), BRAVO, BRAVO_OTHER), same_as_never_sent),
    Row(COMMANDS, "operator", "other-customer", "not served on the operator listener",
        fixed("GET", "/v1/commands?wait=0"), EDGE_404),
    # Operator routes: a key acts on its customer only; agents never reach them.
    Row(DESIRED, "operator", "own", "its environment",
        desired(ALPHA, PROD), desired_accepted, positive=True),
    Row(DESIRED, "operator", "own-other-environment", "its customer's other environment",
        desired(ALPHA, ALPHA_OTHER), desired_accepted, positive=True),
    Row(DESIRED, "operator", "other-customer", "same environment id",
        desired(BRAVO, PROD), refused_and_unchanged(BRAVO)),
    Row(DESIRED, "operator", "other-customer", "its other environment",
        desired(BRAVO, BRAVO_OTHER), refused_and_unchanged(BRAVO)),
    Row(DESIRED, "agent", "other-customer", "not served on the agent listener",
        desired(BRAVO, BRAVO_OTHER), AGENT_EDGE),
    Row(DESIRED, "agent", "other-environment", "not served on the agent listener",
        desired(ALPHA, ALPHA_OTHER), AGENT_EDGE),
    Row(ENVIRONMENTS, "operator", "own", "its customer",
        environments(ALPHA), own_environments, positive=True),
    Row(ENVIRONMENTS, "operator", "other-customer", "another customer",
        environments(BRAVO), refused_like_unknown(404, environments(NOBODY))),
    Row(ENVIRONMENTS, "agent", "other-customer", "not served on the agent listener",
        environments(BRAVO), AGENT_EDGE),
    Row(ENVIRONMENTS, "agent", "own", "not served on the agent listener",
        environments(ALPHA), AGENT_EDGE),
    Row(AUDIT, "operator", "own", "its customer", audit(ALPHA), own_audit, positive=True),
    Row(AUDIT, "operator", "other-customer", "another customer",
        audit(BRAVO), refused_like_unknown(404, audit(NOBODY))),
    Row(AUDIT, "agent", "other-customer", "not served on the agent listener",
        audit(BRAVO), AGENT_EDGE),
    Row(AUDIT, "agent", "own", "not served on the agent listener", audit(ALPHA), AGENT_EDGE),
]  # fmt: skip
for route in PUBLIC:
    # Health, metrics and the document carry no tenant data and are not on the edge:
    # the API answers them to whoever reaches it inside, without any identity.
    path = route[2]
    ROWS += [
        Row(route, "agent", "other-customer", "not served on the agent listener",
            fixed("GET", path), AGENT_EDGE),
        Row(route, "operator", "other-customer", "not served on the operator listener",
            fixed("GET", path), EDGE_404),
        Row(route, "internal", "own", "straight to the API", fixed("GET", path),
            public_answer, positive=True),
    ]  # fmt: skip


# --- gateway_auth: agent identity ------------------------------------------------------

GATEWAY_AUTH = "gateway_auth"
ENROLL = (GATEWAY_AUTH, "POST", "/v1/enroll")
RENEW = (GATEWAY_AUTH, "POST", "/v1/renew")
TOKENS = (GATEWAY_AUTH, "POST", "/v1/operator/customers/{customer_id}/enrollment-tokens")
REVOCATIONS = (GATEWAY_AUTH, "POST", "/v1/operator/customers/{customer_id}/revocations")
IDENTITY_AUDIT = (GATEWAY_AUTH, "GET", "/v1/operator/customers/{customer_id}/identity-audit")
GATEWAY_PUBLIC = [
    (GATEWAY_AUTH, "GET", "/healthz"),
    (GATEWAY_AUTH, "GET", "/readyz"),
    (GATEWAY_AUTH, "GET", "/metrics"),
]
ENROLLED_AGENT = "alpha-enrolled-agent"
"""The agent the enrollment row enrolls, and the one the revocation row revokes."""


def csr_for(agent: str, **names: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, agent)]
    if "customer" in names:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, names["customer"]))
    if "environment" in names:
        attributes.append(
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, names["environment"])
        )
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def enrollment(token: str, **names: str) -> Callable[[World], Request]:
    return lambda world: Request(
        "POST",
        "/v1/enroll",
        {"token": world.enrollment_tokens[token], "csr": csr_for(ENROLLED_AGENT, **names)},
    )


def renewal(**names: str) -> Callable[[World], Request]:
    return lambda world: Request("POST", "/v1/renew", {"csr": csr_for(CALLER_AGENT, **names)})


def tokens(customer: str, environment: str = PROD) -> Callable[[World], Request]:
    return lambda world: Request(
        "POST",
        f"/v1/operator/customers/{customer}/enrollment-tokens",
        {"environment_id": environment},
    )


def revocation(customer: str, environment: str = PROD) -> Callable[[World], Request]:
    return lambda world: Request(
        "POST",
        f"/v1/operator/customers/{customer}/revocations",
        {"environment_id": environment, "agent_id": ENROLLED_AGENT},
    )


def identity_audit(customer: str) -> Callable[[World], Request]:
    return lambda world: Request("GET", f"/v1/operator/customers/{customer}/identity-audit")


async def certificate_issued(world: World, request: Request, reply: Reply) -> None:
    assert reply.status == 201, reply
    body = reply.json()
    assert body["spiffe_id"].startswith(f"spiffe://fleetplane/customer/{ALPHA}/env/{PROD}/")


async def token_created(world: World, request: Request, reply: Reply) -> None:
    assert reply.status == 201, reply
    assert reply.json()["customer_id"] == ALPHA


async def revoked_own(world: World, request: Request, reply: Reply) -> None:
    assert reply.status == 201, reply
    assert (reply.json()["customer_id"], reply.json()["agent_id"]) == (ALPHA, ENROLLED_AGENT)


def refused_and_still_trusted(customer: str) -> Callable[[World, Request, Reply], Awaitable[None]]:
    """404 like a customer that does not exist, and the victim's agents still pass the edge."""
    like_unknown = refused_like_unknown(404, revocation(NOBODY))

    async def check(world: World, request: Request, reply: Reply) -> None:
        await like_unknown(world, request, reply)
        await asyncio.sleep(2)  # longer than the edge's cache of the certificate check
        victim = world.tenant(customer, PROD)
        status, _ = await victim.agent.event_status(victim.event_ids[READ])
        assert status == 200

    return check


async def own_identity_audit(world: World, request: Request, reply: Reply) -> None:
    assert reply.status == 200, reply
    entries = reply.json()["entries"]
    assert {e["customer_id"] for e in entries} == {ALPHA}, reply.text
    assert "token_created" in {e["action"] for e in entries}, reply.text


ROWS += [
    # Enrollment: the token's customer and environment, nothing else.
    Row(ENROLL, "enroll", "own", "a CSR for its token's environment",
        enrollment("enrolls"), certificate_issued, positive=True),
    Row(ENROLL, "enroll", "other-customer", "CSR names another customer",
        enrollment("refused", customer=BRAVO), refused(403)),
    Row(ENROLL, "enroll", "other-environment", "CSR names another environment",
        enrollment("refused", environment=ALPHA_OTHER), refused(403)),
    Row(ENROLL, "agent", "own", "not served on the agent listener",
        enrollment("refused"), AGENT_EDGE),
    Row(ENROLL, "operator", "own", "not served on the operator listener",
        enrollment("refused"), EDGE_404),
    # Renewal: the current certificate's identity only.
    Row(RENEW, "agent", "own", "its own identity", renewal(), certificate_issued, positive=True),
    Row(RENEW, "agent", "other-customer", "CSR names another customer",
        renewal(customer=BRAVO), refused(403)),
    Row(RENEW, "agent", "other-environment", "CSR names another environment",
        renewal(environment=ALPHA_OTHER), refused(403)),
    Row(RENEW, "operator", "own", "not served on the operator listener", renewal(), EDGE_404),
    Row(RENEW, "enroll", "own", "not served on the enrollment listener", renewal(), EDGE_404),
    # Operator routes of gateway_auth: the key's customer only.
    Row(TOKENS, "operator", "own", "its environment", tokens(ALPHA), token_created,
        positive=True),
    Row(TOKENS, "operator", "own-other-environment", "its other environment",
        tokens(ALPHA, ALPHA_OTHER), token_created, positive=True),
    Row(TOKENS, "operator", "other-customer", "same environment id",
        tokens(BRAVO), refused_like_unknown(404, tokens(NOBODY))),
    Row(TOKENS, "operator", "other-customer", "its other environment",
        tokens(BRAVO, BRAVO_OTHER), refused_like_unknown(404, tokens(NOBODY))),
    Row(TOKENS, "agent", "own", "not served on the agent listener", tokens(ALPHA), AGENT_EDGE),
    Row(REVOCATIONS, "operator", "own", "an agent of its environment",
        revocation(ALPHA), revoked_own, positive=True),
    Row(REVOCATIONS, "operator", "other-customer", "same environment id",
        revocation(BRAVO), refused_and_still_trusted(BRAVO)),
    Row(REVOCATIONS, "agent", "other-customer", "not served on the agent listener",
        revocation(BRAVO), AGENT_EDGE),
    Row(IDENTITY_AUDIT, "operator", "own", "its customer",
        identity_audit(ALPHA), own_identity_audit, positive=True),
    Row(IDENTITY_AUDIT, "operator", "other-customer", "another customer",
        identity_audit(BRAVO), refused_like_unknown(404, identity_audit(NOBODY))),
    Row(IDENTITY_AUDIT, "agent", "own", "not served on the agent listener",
        identity_audit(ALPHA), AGENT_EDGE),
]  # fmt: skip
for route in GATEWAY_PUBLIC:
    # The same paths as the API's: the row ids name the service.
    path = route[2]
    ROWS += [
        Row(route, "agent", "other-customer", "gateway_auth's, not served on the agent listener",
            fixed("GET", path), AGENT_EDGE),
        Row(route, "operator", "other-customer",
            "gateway_auth's, not served on the operator listener", fixed("GET", path), EDGE_404),
        Row(route, "internal", "own", "straight to gateway_auth", fixed("GET", path),
            public_answer, positive=True),
    ]  # fmt: skip


def test_the_matrix_covers_every_route() -> None:
    served = served_routes()
    covered = {row.route for row in ROWS}
    assert covered == served, (
        f"routes without rows (add their refusals and positive controls to ROWS): "
        f"{sorted(served - covered)}; rows for no route: "
        f"{sorted(covered - served)}"
    )
    for route in served:
        rows = [row for row in ROWS if row.route == route]
        assert any(row.positive for row in rows), f"{route}: no positive control"
        for caller in ("agent", "operator"):
            assert any(row.caller == caller and not row.positive for row in rows), (
                f"{route}: no refusal row for {caller}s"
            )
        # Every caller that may use the route is tried against another customer's ids.
        for caller in {row.caller for row in rows if row.positive} - {"internal"}:
            assert any(row.caller == caller and row.target == "other-customer" for row in rows), (
                f"{route}: {caller}s never tried on another customer's ids"
            )
    assert len({row.id for row in ROWS}) == len(ROWS), "two rows with the same id"


# --- the seeded world -----------------------------------------------------------------


async def seed(deployment: Deployment, agents: dict[str, AgentClient]) -> World:
    stack = deployment.fleet.stack
    keys = {customer: deployment.operator_key(customer) for customer in (ALPHA, BRAVO)}
    world = World(
        deployment,
        tenants={
            agent_id: Tenant(customer, environment, agents[agent_id])
            for agent_id, (customer, environment) in AGENTS.items()
        },
        operators={
            c: OperatorClient(stack.pki_dir, key, stack.operator_url) for c, key in keys.items()
        },
        operator_keys=keys,
    )
    for agent_id, tenant in world.tenants.items():
        note, service = f"{agent_id}-secret-note", f"{agent_id}-secret-svc"
        tenant.markers += [note, service, f"{tenant.customer}-{tenant.environment}-desired"]
        events = [
            tenant.agent.heartbeat(message=note),
            tenant.agent.observed([{"kind": "deployment", "name": service, "version": "3.1.4"}]),
        ]
        status, body = await tenant.agent.post_events(events)
        assert status == 202, body
        tenant.event_ids = [e["id"] for e in events]
    for tenant in world.tenants.values():
        resource = {"kind": "deployment", "name": tenant.markers[2], "version": "2.7.1"}
        status, body = await world.operators[tenant.customer].set_desired(
            tenant.customer, tenant.environment, 1, [resource]
        )
        assert status == 202, body
        tenant.change_id = body["change_id"]
    for tenant in world.tenants.values():
        # The owners see their own data: what the matrix must not show anyone else is there.
        for event_id in tenant.event_ids:
            await eventually(
                lambda: tenant.agent.event_status(event_id),  # noqa: B023 - awaited at once
                lambda r: r[1]["status"] == "applied",
                what=f"{tenant.agent.agent_id}'s event applied",
            )
        status, reply = await tenant.agent.poll_commands(20)
        assert status == 200, reply
        # Create the desired resource, delete the observed one the desired state lacks.
        assert {c["resource"]["name"] for c in reply["commands"]} == set(tenant.markers[1:])
    for customer, operator in world.operators.items():
        status, body = await operator.request("GET", f"/v1/operator/customers/{customer}/audit")
        assert status == 200, body
        mine = {t.change_id for t in world.tenants.values() if t.customer == customer}
        assert mine <= {e["change_id"] for e in body["entries"]}, body
    for name in ("enrolls", "refused"):
        status, body = await world.operators[ALPHA].request(
            "POST", f"/v1/operator/customers/{ALPHA}/enrollment-tokens", {"environment_id": PROD}
        )
        assert status == 201, body
        world.enrollment_tokens[name] = body["token"]
    return world


@pytest.fixture(scope="module")
def isolation_deployment(stack: Stack) -> Iterator[Deployment]:
    """One deployment for the whole matrix (sync: creating and dropping it runs its own loop)."""
    log_dir = stack.run_dir / "test-logs" / "tenant-isolation"
    deployment = Deployment(FleetEnv.new(stack), log_dir).create()
    try:
        deployment.start_apis()
        deployment.start_controller()
        yield deployment
    finally:
        deployment.close()


@pytest.fixture(scope="module")
async def world(
    isolation_deployment: Deployment,
    stack: Stack,
    issuing_ca: CertificateAuthority,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[World]:
    certs: Path = tmp_path_factory.mktemp("tenant-isolation")
    agents = {
        agent_id: AgentClient.issue(
            issuing_ca, stack.pki_dir, stack.edge_url, (customer, environment, agent_id), certs
        ).open()
        for agent_id, (customer, environment) in AGENTS.items()
    }
    try:
        yield await seed(isolation_deployment, agents)
    finally:
        for agent in agents.values():
            await agent.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
async def test_isolation(world: World, row: Row) -> None:
    request = row.request(world)
    reply = await world.send(
        row.caller,
        request.method,
        request.path,
        request.body,
        service=row.route[0],
        extra_headers=request.headers,
    )
    await row.check(world, request, reply)
    sent = request.path + json.dumps(request.body) + json.dumps(request.headers)
    seen = reply.text + json.dumps(reply.headers)
    leaked = [s for s in world.foreign(row.caller) if s in seen and s not in sent]
    assert not leaked, f"{row.id}: answer carries {leaked}: {reply.status} {reply.text[:500]}"

"""The API's URL map.

Agent routes take identity from the edge's agent listener only; operator routes
(``/v1/operator/...``) need the edge's operator listener and an operator key
(``services.shared.edge_auth``, ``operators.py``). Health, metrics and the OpenAPI
document need no identity.
``openapi.py`` documents every route here (a unit test keeps the two equal).
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from services.api import handlers

OPERATOR_PREFIX: Final = "/v1/operator"


def setup_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/healthz", handlers.healthz, name="healthz")
    router.add_get("/readyz", handlers.readyz, name="readyz")
    router.add_get("/metrics", handlers.metrics, name="metrics")
    router.add_get("/openapi.json", handlers.openapi_json, name="openapi")
    router.add_post("/v1/events", handlers.post_events, name="post_events")
    router.add_get("/v1/events/{event_id}", handlers.get_event, name="get_event")
    router.add_get("/v1/commands", handlers.get_commands, name="get_commands")
    customer = OPERATOR_PREFIX + "/customers/{customer_id}"
    router.add_put(
        customer + "/environments/{environment_id}/desired-state",
        handlers.put_desired_state,
        name="put_desired_state",
    )
    router.add_get(customer + "/environments", handlers.get_environments, name="get_environments")
    router.add_get(customer + "/audit", handlers.get_audit, name="get_audit")

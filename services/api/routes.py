"""The API's URL map, built from ``openapi.OPERATIONS``: the one list of routes.

Agent routes take identity from the edge's agent listener only; operator routes
(``/v1/operator/...``) need the edge's operator listener and an operator key.
Health, metrics and the OpenAPI document need no identity. The OpenAPI document
is built from the same list, so every route is documented.
"""

from __future__ import annotations

from aiohttp import web

from services.api.openapi import OPERATIONS


def setup_routes(app: web.Application) -> None:
    for operation in OPERATIONS:
        if operation.method == "GET":
            # add_get answers HEAD too, as aiohttp's routes always have here.
            app.router.add_get(operation.path, operation.handler, name=operation.name)
        else:
            app.router.add_route(
                operation.method, operation.path, operation.handler, name=operation.name
            )

"""The API's URL map. Agent routes take identity from the edge only (see auth.py)."""

from __future__ import annotations

from aiohttp import web

from services.api import handlers


def setup_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/healthz", handlers.healthz, name="healthz")
    router.add_get("/readyz", handlers.readyz, name="readyz")
    router.add_get("/metrics", handlers.metrics, name="metrics")
    router.add_post("/v1/events", handlers.post_events, name="post_events")
    router.add_get("/v1/events/{event_id}", handlers.get_event, name="get_event")

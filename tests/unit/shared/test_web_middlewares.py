"""The shared HTTP layer on a small app: request ids, metrics by route template, problems."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.shared.problems import ServiceUnavailable, ValidationFailed
from services.shared.web.middlewares import REQUEST_ID, http_middlewares


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    request_duration: Histogram


METRICS = web.AppKey("metrics", Metrics)


def new_metrics() -> Metrics:
    registry = CollectorRegistry()
    return Metrics(
        registry,
        Counter("requests", "r", ["route", "method", "status"], registry=registry),
        Histogram("duration", "d", ["route", "method"], registry=registry),
    )


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"request_id": request[REQUEST_ID]})


async def refuse(request: web.Request) -> web.Response:
    raise ValidationFailed("bad item")


async def down(request: web.Request) -> web.Response:
    raise ServiceUnavailable("the database is down", retry_after_s=3)


async def crash(request: web.Request) -> web.Response:
    raise RuntimeError("secret internals")


async def echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read())


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application(
        middlewares=http_middlewares(lambda app: app[METRICS], service="test service"),
        client_max_size=1024,
    )
    app[METRICS] = new_metrics()
    app.router.add_get("/items/{item}", ok)
    app.router.add_post("/refuse", refuse)
    app.router.add_get("/down", down)
    app.router.add_get("/crash", crash)
    app.router.add_post("/echo", echo)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def counted(client: TestClient[web.Request, web.Application], **labels: str) -> float:
    value = client.app[METRICS].registry.get_sample_value("requests_total", labels)
    return value or 0.0


async def test_a_well_formed_request_id_is_kept_and_anything_else_replaced(
    client: TestClient[web.Request, web.Application],
) -> None:
    reply = await client.get("/items/1", headers={"X-Request-Id": "edge-1:a"})
    assert reply.headers["X-Request-Id"] == "edge-1:a"
    assert (await reply.json())["request_id"] == "edge-1:a"
    reply = await client.get("/items/1", headers={"X-Request-Id": "bad id\u00e9"})
    minted = reply.headers["X-Request-Id"]
    assert minted != "bad id\u00e9"
    assert len(minted) == 32


async def test_answers_are_counted_and_timed_by_route_template(
    client: TestClient[web.Request, web.Application],
) -> None:
    for item in ("1", "2"):
        await client.get(f"/items/{item}")
    await client.post("/refuse")
    await client.request("PROPFIND", "/items/1")
    assert counted(client, route="/items/{item}", method="GET", status="200") == 2
    assert counted(client, route="/refuse", method="POST", status="422") == 1
    # A method outside the known set is one label value, whatever the client sent.
    samples = client.app[METRICS].registry.collect()
    methods = {s.labels["method"] for m in samples for s in m.samples if m.name == "requests"}
    assert methods == {"GET", "POST", "other"}
    duration = client.app[METRICS].registry.get_sample_value(
        "duration_count", {"route": "/items/{item}", "method": "GET"}
    )
    assert duration == 2


async def test_problems_are_rfc_9457_bodies_with_the_request_id(
    client: TestClient[web.Request, web.Application], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="services.shared.web.middlewares"):
        reply = await client.post("/refuse", headers={"X-Request-Id": "r1"})
        assert reply.status == 422
        assert reply.content_type == "application/problem+json"
        body: dict[str, Any] = await reply.json(content_type=None)
        assert body["type"] == "urn:fleetplane:problem:validation-failed"
        assert body["request_id"] == "r1"
        reply = await client.get("/down")
        assert reply.status == 503
        assert reply.headers["Retry-After"] == "3"
    levels = {
        record.getMessage().split(" answered ")[1][:3]: record.levelno for record in caplog.records
    }
    # A refused request is routine; a dependency down is worth a warning.
    assert levels == {"422": logging.INFO, "503": logging.WARNING}


async def test_an_unexpected_error_is_a_500_without_internals(
    client: TestClient[web.Request, web.Application],
) -> None:
    reply = await client.get("/crash")
    assert reply.status == 500
    text = await reply.text()
    assert "secret internals" not in text
    assert "logged with the request id" in text


async def test_routing_and_size_errors_are_problems_too(
    client: TestClient[web.Request, web.Application],
) -> None:
    reply = await client.get("/nowhere")
    assert (reply.status, (await reply.json(content_type=None))["detail"]) == (
        404,
        "no such resource",
    )
    reply = await client.put("/refuse")
    assert reply.status == 405
    assert reply.headers["Allow"] == "POST"
    reply = await client.post("/echo", data=b"x" * 2048)
    assert reply.status == 413
    detail = (await reply.json(content_type=None))["detail"]
    assert detail == "the request body is larger than the test service accepts"

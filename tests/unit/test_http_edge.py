"""The HTTP edge every server shares: 422 with field and reason, 413, bearer auth."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Route

from rbee.contracts.operations import OperationBase
from rbee.errors import NoWorkerAvailable, QueueFull
from rbee.http import MAX_BODY_BYTES, install_edge
from rbee.jobs import JobRegistry, JobServer, emit_token, job_router

TOKEN = "s3cret-token-0123456789"


async def executor(op: OperationBase) -> None:
    await emit_token("ok")


def make_app(token: str | None = None, admit: Any = None) -> FastAPI:
    registry = JobRegistry(actor="test")
    server = JobServer(registry, executor, admit=admit)
    app = FastAPI()
    install_edge(app, token=token)
    app.include_router(job_router(lambda request: server))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info() -> dict[str, str]:
        return {"component": "test"}

    return app


async def client_for(app: FastAPI, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test", **kw)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with await client_for(make_app()) as c:
        yield c


# -- 422 ---------------------------------------------------------------------------


async def test_invalid_operation_is_422_with_field_and_reason(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json={"operation": "infer", "prompt": "hi", "top_p": 7})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["kind"] == "invalid_operation"
    assert error["field"] == "top_p"
    assert error["problems"] == [{"field": "top_p", "reason": error["problems"][0]["reason"]}]
    assert "less than or equal to 1" in error["problems"][0]["reason"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"operation": "nope"}, "operation"),
        ({"prompt": "x"}, "operation"),
        ({"operation": "infer", "prompt": "x", "extra": 1}, "extra"),
        ({"operation": "infer", "prompt": "a\x00b"}, "prompt"),
        ({"operation": "model_get", "model": "../../etc/passwd"}, "model"),
    ],
)
async def test_bad_operations_name_their_field(client: httpx.AsyncClient, body: dict[str, Any], field: str) -> None:
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["field"] == field


async def test_malformed_json_is_422_naming_the_body(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", content=b"{oops", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "body"


async def test_bad_query_parameter_is_422_with_field_and_reason(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/jobs", params={"limit": 0})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "limit"
    assert "greater than or equal to 1" in error["message"]


async def test_bad_input_creates_no_job(client: httpx.AsyncClient) -> None:
    await client.post("/v1/jobs", json={"operation": "infer", "prompt": "x", "temperature": 3})
    assert (await client.get("/v1/jobs")).json()["jobs"] == []


# -- typed errors at POST ------------------------------------------------------------


async def test_queue_full_is_429_with_retry_after() -> None:
    def admit(op: OperationBase) -> None:
        raise QueueFull("too many", retry_after_s=3)

    async with await client_for(make_app(admit=admit)) as client:
        response = await client.post("/v1/jobs", json={"operation": "status"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.json()["error"] == {"kind": "queue_full", "message": "too many"}


async def test_async_admit_errors_map_to_their_status() -> None:
    async def admit(op: OperationBase) -> None:
        await asyncio.sleep(0)
        raise NoWorkerAvailable("no worker can serve this model")

    async with await client_for(make_app(admit=admit)) as client:
        response = await client.post("/v1/jobs", json={"operation": "status"})
    assert response.status_code == 503
    assert response.json()["error"]["kind"] == "no_worker"


# -- 413 ------------------------------------------------------------------------------


async def test_body_over_one_mib_with_content_length_is_413(client: httpx.AsyncClient) -> None:
    body = json.dumps({"operation": "infer", "prompt": "x" * MAX_BODY_BYTES}).encode()
    response = await client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["kind"] == "payload_too_large"


async def test_chunked_body_over_one_mib_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"operation": "infer", "prompt": "'
        for _ in range(5):
            yield b"x" * (256 * 1024)
        yield b'"}'

    response = await client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["kind"] == "payload_too_large"
    assert (await client.get("/v1/jobs")).json()["jobs"] == []


async def test_body_just_under_the_limit_is_read(client: httpx.AsyncClient) -> None:
    prompt = "x" * 90_000  # within the prompt limit, far under 1 MiB
    response = await client.post("/v1/jobs", json={"operation": "infer", "prompt": prompt})
    assert response.status_code == 201


# -- bearer auth ------------------------------------------------------------------------


def every_endpoint(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path) the app serves: its OpenAPI operations plus the docs routes."""
    found = [
        (method.upper(), re.sub(r"\{[^}]+\}", "job-x", path))
        for path, item in app.openapi()["paths"].items()
        for method in item
    ]
    for route in app.routes:
        if isinstance(route, Route) and not isinstance(route, APIRoute):
            found += [(m, route.path) for m in sorted(route.methods or ()) if m != "HEAD"]
    return found


async def test_with_a_token_every_endpoint_but_health_needs_bearer() -> None:
    app = make_app(token=TOKEN)
    endpoints = every_endpoint(app)
    assert ("POST", "/v1/jobs") in endpoints and ("GET", "/openapi.json") in endpoints
    async with await client_for(app) as client:
        for method, path in endpoints:
            response = await client.request(method, path)
            if path == "/health":
                assert response.status_code == 200
                continue
            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["kind"] == "unauthorized"
            wrong = await client.request(method, path, headers={"Authorization": f"Bearer {TOKEN}x"})
            assert wrong.status_code == 401, (method, path)
            right = await client.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
            assert right.status_code != 401, (method, path)


async def test_with_a_token_the_job_flow_works_with_bearer() -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with await client_for(make_app(token=TOKEN), headers=headers) as client:
        job_id = (await client.post("/v1/jobs", json={"operation": "status"})).json()["job_id"]
        async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
            body = (await response.aread()).decode()
    assert response.status_code == 200
    assert body.rstrip().endswith("data: [DONE]")


async def test_without_a_token_nothing_needs_auth(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/jobs")).status_code == 200
    assert (await client.get("/v1/info")).status_code == 200


async def test_unauthorized_request_body_is_not_read() -> None:
    async with await client_for(make_app(token=TOKEN)) as client:
        response = await client.post("/v1/jobs", json={"operation": "status"})
        assert response.status_code == 401
        listed = await client.get("/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
    assert listed.json()["jobs"] == []


async def test_the_bearer_scheme_is_case_insensitive_and_the_token_is_not() -> None:
    async with await client_for(make_app(token=TOKEN)) as client:
        for scheme in ("Bearer", "bearer", "BEARER"):
            r = await client.get("/v1/jobs", headers={"Authorization": f"{scheme} {TOKEN}"})
            assert r.status_code == 200, scheme
        for wrong in (f"Bearer {TOKEN.upper()}", f"Basic {TOKEN}", TOKEN, "bearer"):
            assert (await client.get("/v1/jobs", headers={"Authorization": wrong})).status_code == 401, wrong

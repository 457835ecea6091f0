"""No web page can drive a token-less daemon: queen, hive and worker refuse a cross-site
``text/plain`` POST, a foreign ``Origin`` and a rebound ``Host``, and change nothing."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rbee.hive.app import HiveSettings, create_hive_app
from rbee.http import BrowserGuard
from rbee.queen.app import QueenSettings, create_queen_app
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(30)

HOME = Path(tempfile.mkdtemp(prefix="rbee-guard-"))
OWN = "127.0.0.1:7833"


def _queen() -> FastAPI:
    return create_queen_app(QueenSettings(home=HOME / "queen"))


def _hive() -> FastAPI:
    return create_hive_app(
        HiveSettings(home=HOME / "hive", port=0, worker_engine="fake", worker_command=("/bin/false",))  # type: ignore[arg-type]
    )


def _worker() -> FastAPI:
    return create_worker_app(FakeEngine(), WorkerSettings())


DAEMONS: dict[str, Callable[[], FastAPI]] = {"queen": _queen, "hive": _hive, "worker": _worker}
OPS = {
    "queen": {"operation": "status"},
    "hive": {"operation": "model_list"},
    "worker": {"operation": "infer", "model": "fake-model", "prompt": "hi", "max_tokens": 2},
}


@contextlib.asynccontextmanager
async def served(make: Callable[[], FastAPI]) -> AsyncIterator[httpx.AsyncClient]:
    app = make()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{OWN}") as client:
            async with asyncio.timeout(10):  # a worker takes jobs once its (fake) model is loaded
                while (r := await client.get("/v1/ready")).status_code == 200 and not r.json().get("ready", True):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            yield client


async def _jobs(client: httpx.AsyncClient) -> int:
    r = await client.get("/v1/jobs")
    assert r.status_code == 200, r.text
    return len(r.json()["jobs"])


@pytest.mark.parametrize("name", list(DAEMONS))
async def test_a_cross_site_text_plain_post_is_refused_and_changes_nothing(name: str) -> None:
    async with served(DAEMONS[name]) as client:
        before = await _jobs(client)
        body = httpx.Request("POST", "/", json=OPS[name]).content
        # What a form or fetch(no-cors) on another site sends: no preflight, text/plain.
        r = await client.post(
            "/v1/jobs", content=body, headers={"Content-Type": "text/plain", "Origin": "http://evil.example"}
        )
        assert r.status_code == 403
        assert r.json()["error"]["kind"] == "forbidden" and "evil.example" in r.json()["error"]["message"]
        # The same without an Origin (an old browser, a page that hid it): the body type is refused.
        r = await client.post("/v1/jobs", content=body, headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        assert "application/json" in r.json()["error"]["message"]
        assert await _jobs(client) == before
        # The daemon's own page and a plain client still work.
        own = await client.post("/v1/jobs", json=OPS[name], headers={"Origin": f"http://{OWN}"})
        assert own.status_code == 201, own.text
        assert own.headers["access-control-allow-origin"] == f"http://{OWN}"
        assert (await client.post("/v1/jobs", json=OPS[name])).status_code == 201


@pytest.mark.parametrize("name", list(DAEMONS))
async def test_a_read_after_dns_rebinding_is_refused(name: str) -> None:
    async with served(DAEMONS[name]) as client:
        for path in ("/v1/jobs", "/v1/jobs?limit=2", "/openapi.json"):
            r = await client.get(path, headers={"Host": "attacker.example:7833"})
            assert r.status_code == 403, path
            assert "attacker.example" in r.json()["error"]["message"]
        # Health probes by any name still answer; addresses and localhost are served.
        assert (await client.get("/health", headers={"Host": "attacker.example"})).status_code == 200
        for host in ("localhost:7833", "127.0.0.5:80", "[::1]:7833", "10.0.0.2"):
            assert (await client.get("/v1/jobs", headers={"Host": host})).status_code == 200, host


async def test_openai_paths_refuse_in_openais_shape() -> None:
    async with served(_queen) as client:
        r = await client.post("/v1/completions", content=b"{}", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = await client.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "invalid_request_error"


async def _echo(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_configured_origins_and_hosts_get_in_and_get_cors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_ALLOW_ORIGINS", "https://chat.example")
    monkeypatch.setenv("RBEE_ALLOW_HOSTS", "queen.lan")
    guard = BrowserGuard(_echo, allowed_origins=["http://tool.example/"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://queen.lan") as client:
        for origin in ("https://chat.example", "http://tool.example"):
            r = await client.get("/v1/jobs", headers={"Origin": origin})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
            pre = await client.options(
                "/v1/jobs",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization",
                },
            )
            assert pre.status_code == 204
            assert "authorization" in pre.headers["access-control-allow-headers"]
        r = await client.get("/v1/jobs", headers={"Origin": "https://other.example"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        assert (await client.get("/", headers={"Host": "other.lan"})).status_code == 403
        # An empty body needs no type; a JSON one with a charset is JSON.
        assert (await client.post("/v1/jobs/x", headers={"Content-Length": "0"})).status_code == 200
        r = await client.post("/v1/jobs", content=b"{}", headers={"Content-Type": "application/json; charset=utf-8"})
        assert r.status_code == 200


async def test_no_redirect_is_built_from_a_foreign_host() -> None:
    async with served(_queen) as client:
        r = await client.get("/static/app.js/", headers={"Host": "evil.example"})
        assert r.status_code == 403 and "location" not in r.headers

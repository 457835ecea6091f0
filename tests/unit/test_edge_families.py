"""The edge's own refusals (401, 403, 404, 413, 415) in the error shape of each path's API.

Ollama's clients read ``{"error": "..."}``, Anthropic's ``{"type": "error", "error":
{"type", "message"}}``, OpenAI's ``{"error": {"message", "type", "param", "code"}}``; rbee's
own paths keep ``{"error": {"kind", "message"}}``. Each status is tried on each family,
on the queen (whose APIs these are).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee.http import api_family
from rbee.queen.app import QueenSettings, create_queen_app

pytestmark = pytest.mark.timeout(30)

TOKEN = "edge-family-token-0123456789"
JSON = {"Content-Type": "application/json"}


def _ollama(body: Any, status: int) -> None:
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body


def _anthropic(body: Any, status: int) -> None:
    kinds = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 413: "request_too_large"}
    assert body["type"] == "error" and set(body) == {"type", "error"}, body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kinds.get(status, "invalid_request_error"), body


def _openai(body: Any, status: int) -> None:
    codes = {401: "invalid_api_key", 403: "forbidden", 404: "not_found", 413: "payload_too_large"}
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == codes.get(status, "unsupported_media_type"), body


def _rbee(body: Any, status: int) -> None:
    kinds = {401: "unauthorized", 403: "forbidden", 404: "not_found", 413: "payload_too_large"}
    assert set(body) == {"error"} and body["error"]["kind"] == kinds.get(status, "unsupported_media_type"), body


Check = Callable[[Any, int], None]
#: (a body-taking path of each family, its error shape, a path of the family that does not exist)
FAMILIES: list[tuple[str, Check, str]] = [
    ("/api/chat", _ollama, "/api/nope"),
    ("/api/embed", _ollama, "/api"),
    ("/v1/messages", _anthropic, "/v1/messages/nope"),
    ("/v1/messages/count_tokens", _anthropic, "/v1/messages/batches"),
    ("/v1/embeddings", _openai, "/v1/audio/speech"),
    ("/v1/chat/completions", _openai, "/v1/nope"),
    ("/v1/tokenize", _openai, "/v1/tokenize/nope"),
    ("/tokenize", _openai, "/v1/files"),
    ("/v1/jobs", _rbee, "/v1/jobs/job-x/nope"),
]
IDS = [path for path, _, _ in FAMILIES]


@contextlib.asynccontextmanager
async def queen(home: Path, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_queen_app(QueenSettings(home=home, **settings))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://queen") as client,
    ):
        yield client


def test_paths_belong_to_their_api() -> None:
    assert [api_family(p) for p in ("/api/chat", "/api", "/apix")] == ["ollama", "ollama", "rbee"]
    assert [api_family(p) for p in ("/v1/messages", "/v1/messages/count_tokens")] == ["anthropic"] * 2
    assert [api_family(p) for p in ("/v1/models/x", "/v1/embeddings", "/infill")] == ["openai"] * 3
    assert [api_family(p) for p in ("/v1/jobs", "/v1/tokens/count", "/health", "/")] == ["rbee"] * 4


@pytest.mark.parametrize(("path", "check", "_missing"), FAMILIES, ids=IDS)
async def test_401_without_or_with_a_wrong_token(tmp_path: Path, path: str, check: Check, _missing: str) -> None:
    async with queen(tmp_path, token=TOKEN) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = await client.post(path, json={}, headers=headers)
            assert r.status_code == 401, r.text
            assert r.headers["www-authenticate"] == "Bearer"
            check(r.json(), 401)
        r = await client.post(path, json={}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code != 401


@pytest.mark.parametrize(("path", "check", "_missing"), FAMILIES, ids=IDS)
async def test_403_for_a_foreign_host_or_origin(tmp_path: Path, path: str, check: Check, _missing: str) -> None:
    async with queen(tmp_path) as client:
        r = await client.post(path, json={}, headers={"Host": "evil.example"})
        assert r.status_code == 403, r.text
        check(r.json(), 403)
        assert "evil.example" in r.text
        r = await client.post(path, json={}, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403, r.text
        check(r.json(), 403)


@pytest.mark.parametrize(("path", "check", "_missing"), FAMILIES, ids=IDS)
async def test_413_with_a_content_length_or_streamed(tmp_path: Path, path: str, check: Check, _missing: str) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "m", "prompt": "'
        for _ in range(3):
            yield b"x" * 500_000
        yield b'"}'

    async with queen(tmp_path) as client:
        r = await client.post(path, content=b"x" * 1_500_000, headers=JSON)
        assert r.status_code == 413, r.text
        check(r.json(), 413)
        r = await client.post(path, content=chunks(), headers=JSON)
        assert r.status_code == 413, r.text
        check(r.json(), 413)


@pytest.mark.parametrize(("path", "check", "_missing"), FAMILIES, ids=IDS)
async def test_415_for_a_body_that_is_not_json(tmp_path: Path, path: str, check: Check, _missing: str) -> None:
    async with queen(tmp_path) as client:
        for kind in ("text/plain", "application/x-www-form-urlencoded", ""):
            r = await client.post(path, content=b'{"model": "m"}', headers={"Content-Type": kind})
            assert r.status_code == 415, r.text
            check(r.json(), 415)


@pytest.mark.parametrize(("_path", "check", "missing"), FAMILIES, ids=IDS)
async def test_404_for_a_path_the_api_lacks(tmp_path: Path, _path: str, check: Check, missing: str) -> None:
    async with queen(tmp_path) as client:
        r = await client.post(missing, json={})
        assert r.status_code == 404, r.text
        check(r.json(), 404)


async def test_openapi_declares_each_familys_error_shape(tmp_path: Path) -> None:
    async with queen(tmp_path, token=TOKEN) as client:
        schema = (await client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})).json()
    assert schema["components"]["schemas"]["OllamaError"]["properties"]["error"] == {"type": "string"}
    wanted = {
        "/api/chat": "OllamaError",
        "/v1/messages": "AnthropicError",
        "/v1/embeddings": "OpenAIError",
        "/tokenize": "OpenAIError",
        "/v1/jobs": "Error",
    }
    for path, component in wanted.items():
        responses = schema["paths"][path]["post"]["responses"]
        for status in ("401", "403", "413", "415"):
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{component}", (path, status)


async def test_415_for_a_delete_body_that_is_not_json_in_ollamas_shape(tmp_path: Path) -> None:
    async with queen(tmp_path) as client:
        r = await client.request(
            "DELETE", "/api/delete", content=b'{"model": "m"}', headers={"Content-Type": "text/plain"}
        )
        assert r.status_code == 415, r.text
        _ollama(r.json(), 415)

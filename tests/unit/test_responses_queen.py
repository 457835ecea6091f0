"""The queen's OpenAI Responses API in process: validation, errors, the edge, answers from a fake worker.

The fake worker is a real worker app with the scripted engine, reached in
process (the queen's HTTP client is given an ASGI transport to it). The real
model, through real processes and the official SDK, is in
tests/e2e/test_responses_api.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rbee.queen.app import QueenSettings, create_queen_app
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(30)

TOKEN = "queen-test-token-0123456789"
MODEL = "gemma3-270m"
MODEL_ID = "gemma-3-270m-q4_k_m"
JSON = {"Content-Type": "application/json"}
PIECES = ["Hello", " there", ", friend", ".", " Bye"]
ORIGIN = "https://chat.example"


@contextlib.asynccontextmanager
async def queen(home: Path, **settings: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_queen_app(QueenSettings(home=home, **settings))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://queen") as client,
    ):
        yield app, client


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with queen(tmp_path) as (_, c):
        yield c


def _beat(workers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "hive_id": "alpha",
        "url": "http://hive",
        "models": [{"id": MODEL_ID, "alias": MODEL}],
        "workers": workers or [],
    }


@contextlib.asynccontextmanager
async def with_worker(tmp_path: Path, **engine: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A queen whose one worker is a fake one in process."""
    worker = create_worker_app(
        FakeEngine(model_id=MODEL_ID, pieces=engine.pop("pieces", PIECES), **engine),
        WorkerSettings(worker_id="w1", aliases=[MODEL]),
    )
    async with worker.router.lifespan_context(worker), queen(tmp_path) as (app, client):
        app.state.queen.http._transport = httpx.ASGITransport(worker)
        app.state.queen.http.http1 = None  # every request through the worker app, not a socket
        await asyncio.wait_for(worker.state.worker.load_done.wait(), 10)  # the model is loaded
        report = {
            "worker_id": "w1",
            "model": MODEL_ID,
            "model_aliases": [MODEL],
            "state": "ready",
            "url": "http://worker",
            "n_ctx": 4096,
        }
        assert (await client.post("/v1/hives/heartbeat", json=_beat([report]))).status_code == 200
        yield app, client


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    return error


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in text.replace("\r\n", "\n").split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


# -- refused before a job exists ----------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "hi"}, "model"),
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": 3}, "input"),
        ({"model": MODEL, "input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"model": MODEL, "input": [{"role": "user"}]}, "input[0].content"),
        ({"model": MODEL, "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].type"),
        (
            {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"model": MODEL, "input": "hi", "instructions": 3}, "instructions"),
        ({"model": MODEL, "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": MODEL, "input": "hi", "max_output_tokens": "4"}, "max_output_tokens"),
        ({"model": MODEL, "input": "hi", "max_output_tokens": 10**9}, "max_output_tokens"),
        ({"model": MODEL, "input": "hi", "temperature": 3}, "temperature"),
        ({"model": MODEL, "input": "hi", "top_p": 1.5}, "top_p"),
        ({"model": MODEL, "input": "hi", "stream": "yes"}, "stream"),
        ({"model": MODEL, "input": "hi", "tools": [{"type": "function", "name": "get_weather"}]}, "tools"),
        ({"model": MODEL, "input": "hi", "tool_choice": "required"}, "tool_choice"),
        ({"model": MODEL, "input": "hi", "previous_response_id": 7}, "previous_response_id"),
        ({"model": MODEL, "input": "hi", "conversation": "conv_1"}, "conversation"),
        ({"model": MODEL, "input": "hi", "include": ["reasoning.encrypted_content"]}, "include"),
        ({"model": MODEL, "input": "hi", "truncation": "auto"}, "truncation"),
        ({"model": MODEL, "input": "hi", "reasoning": {"effort": "high"}}, "reasoning"),
        ({"model": MODEL, "input": "hi", "background": True}, "background"),
        ({"model": MODEL, "input": "hi", "metadata": "x"}, "metadata"),
        ({"model": MODEL, "input": "hi", "store": "yes"}, "store"),
        ({"model": MODEL, "input": "hi", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        (
            {"model": MODEL, "input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
            "text.format.schema",
        ),
        ({"model": "../etc", "input": "hi"}, "model"),
    ],
)
async def test_bad_request_is_400_naming_the_param(client: httpx.AsyncClient, body: dict[str, Any], param: str) -> None:
    r = await client.post("/v1/responses", json=body)
    error = _error(r, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"].startswith(param), error
    assert "x-rbee-job-id" not in r.headers
    assert (await client.get("/v1/jobs")).json()["jobs"] == []


async def test_tools_are_refused_by_name(client: httpx.AsyncClient) -> None:
    tools = [{"type": "function", "name": "get_weather"}, {"type": "web_search"}]
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "tools": tools})
    message = _error(r, 400)["message"]
    assert "get_weather" in message and "web_search" in message
    # No tools, or tool_choice none/auto, is fine (past validation: no worker here).
    for extra in ({"tools": []}, {"tool_choice": "none"}, {"tool_choice": "auto", "store": False}):
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "hi", **extra})
        assert r.status_code == 503, r.text


async def test_parameters_are_taken_as_openai_takes_them(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_tokens": 5})
    assert _error(r, 400) == {
        "message": "Unrecognized request argument supplied: max_tokens",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "unknown_parameter",
    }
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "background": True})
    assert _error(r, 400)["code"] == "unsupported_parameter"
    informational = {
        "user": "u1",
        "metadata": {"k": "v"},
        "store": True,
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "parallel_tool_calls": True,
        "max_tool_calls": 3,
        "truncation": "disabled",
        "reasoning": {},
        "include": [],
        "background": False,
    }
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "hi", **informational})
    assert r.status_code == 503, r.text  # past validation: no worker here


async def test_an_unknown_previous_response_is_openais_404(client: httpx.AsyncClient) -> None:
    for missing in ("resp_00000000000000000000000000000000", "resp_nothex"):
        body = {"model": MODEL, "input": "hi", "previous_response_id": missing}
        error = _error(await client.post("/v1/responses", json=body), 404)
        assert error["code"] == "previous_response_not_found" and error["param"] == "previous_response_id"
        assert error["message"] == f"Previous response with id {missing!r} not found."


async def test_previous_response_id_continues_the_conversation(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (_, client):
        first = await client.post(
            "/v1/responses",
            json={"model": MODEL, "instructions": "Be brief.", "input": "hi", "max_output_tokens": 2},
        )
        assert first.status_code == 200, first.text
        body = {
            "model": MODEL,
            "input": "and then?",
            "previous_response_id": first.json()["id"],
            "max_output_tokens": 2,
        }
        second = await client.post("/v1/responses", json=body)
        assert second.status_code == 200, second.text
        assert second.json()["previous_response_id"] == first.json()["id"]
        job = (await client.get(f"/v1/jobs/{second.headers['x-rbee-job-id']}")).json()
        turns = [(m["role"], m["content"]) for m in job["payload"]["messages"]]
        assert turns == [("system", "Be brief."), ("user", "hi"), ("assistant", "Hello there"), ("user", "and then?")]
        # A chain: the third sees all of it; new instructions replace the old.
        third = await client.post(
            "/v1/responses",
            json={**body, "previous_response_id": second.json()["id"], "instructions": "Be kind.", "input": "ok"},
        )
        job = (await client.get(f"/v1/jobs/{third.headers['x-rbee-job-id']}")).json()
        turns = [(m["role"], m["content"]) for m in job["payload"]["messages"]]
        assert turns[0] == ("system", "Be kind.") and turns[1:3] == [("user", "hi"), ("assistant", "Hello there")]
        assert turns[-2:] == [("assistant", "Hello there"), ("user", "ok")] and len(turns) == 6


async def test_without_max_output_tokens_the_answer_runs_to_the_context(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (app, client):
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "hi"})
        assert r.status_code == 200, r.text
        op = app.state.queen.registry.get(r.headers["x-rbee-job-id"]).operation
        assert op.to_the_context and op.max_tokens == 4096 - r.json()["usage"]["input_tokens"]
        assert r.json()["max_output_tokens"] is None


async def test_body_that_is_not_json_or_not_an_object_is_400(client: httpx.AsyncClient) -> None:
    _error(await client.post("/v1/responses", content=b"{oops", headers=JSON), 400)
    _error(await client.post("/v1/responses", json=[1]), 400)


async def test_unknown_model_is_404_and_no_worker_is_503(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "input": "hi"}
    assert _error(await client.post("/v1/responses", json=body), 503)["type"] == "server_error"
    await client.post("/v1/hives/heartbeat", json=_beat())
    error = _error(await client.post("/v1/responses", json={**body, "model": "nope"}), 404)
    assert error["param"] == "model" and "nope" in error["message"]


# -- answers from a fake worker -------------------------------------------------------


async def test_response_object_usage_and_incomplete(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (_, client):
        body = {
            "model": MODEL,
            "instructions": "Be brief.",
            "input": [
                {"role": "developer", "content": "Answer in English."},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
                {"role": "user", "content": "again"},
            ],
            "max_output_tokens": 3,
            "metadata": {"run": "7"},
            "temperature": 0,
        }
        r = await client.post("/v1/responses", json=body)
        assert r.status_code == 200, r.text
        response = r.json()
        assert response["id"].startswith("resp_") and response["object"] == "response"
        assert isinstance(response["created_at"], int) and response["model"] == MODEL
        assert response["status"] == "incomplete"
        assert response["incomplete_details"] == {"reason": "max_output_tokens"}
        assert response["metadata"] == {"run": "7"} and response["instructions"] == "Be brief."
        assert response["max_output_tokens"] == 3 and response["temperature"] == 0
        [item] = response["output"]
        assert item["type"] == "message" and item["id"].startswith("msg_") and item["role"] == "assistant"
        assert item["content"] == [
            {"type": "output_text", "text": "Hello there, friend", "annotations": [], "logprobs": []}
        ]
        usage = response["usage"]
        assert usage["output_tokens"] == 3 and usage["input_tokens"] > 0
        assert usage["total_tokens"] == usage["input_tokens"] + 3
        assert set(usage["input_tokens_details"]) == {"cached_tokens"}
        assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
        job = (await client.get(f"/v1/jobs/{r.headers['x-rbee-job-id']}")).json()
        assert job["status"] == "completed" and job["operation"] == "infer"
        roles = [m["role"] for m in job["payload"]["messages"]]
        assert roles == ["system", "system", "user", "assistant", "user"]
        assert job["payload"]["max_tokens"] == 3
        # All of it, to the end of the script: completed.
        r = await client.post("/v1/responses", json={**body, "max_output_tokens": 50})
        assert r.json()["status"] == "completed" and r.json()["incomplete_details"] is None
        assert r.json()["output"][0]["status"] == "completed"
        assert r.json()["output"][0]["content"][0]["text"] == "".join(PIECES)


async def test_text_format_becomes_the_jobs_json_schema(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    async with with_worker(tmp_path) as (_, client):
        for fmt, expected in (
            ({"type": "json_schema", "name": "thing", "schema": schema, "strict": True}, schema),
            ({"type": "json_object"}, {"type": "object"}),
            ({"type": "text"}, None),
        ):
            r = await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "text": {"format": fmt}})
            assert r.status_code == 200, r.text
            assert r.json()["text"]["format"] == fmt
            job = (await client.get(f"/v1/jobs/{r.headers['x-rbee-job-id']}")).json()
            assert job["payload"].get("json_schema") == expected


async def test_stream_has_openais_events_in_order(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (_, client):
        body = {"model": MODEL, "input": "hi", "stream": True, "metadata": {"k": "v"}}
        r = await client.post("/v1/responses", json=body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-rbee-job-id"].startswith("job-")
        events = _events(r.text)
        names = [name for name, _ in events]
        head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
        tail = [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
        assert names[:4] == head and names[-4:] == tail
        assert names[4:-4] == ["response.output_text.delta"] * len(PIECES)
        assert all(data["type"] == name for name, data in events)
        assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
        created = events[0][1]["response"]
        assert created["status"] == "in_progress" and created["output"] == [] and created["metadata"] == {"k": "v"}
        item_id = events[2][1]["item"]["id"]
        deltas = [d for n, d in events if n == "response.output_text.delta"]
        assert all((d["item_id"], d["output_index"], d["content_index"]) == (item_id, 0, 0) for d in deltas)
        text = "".join(d["delta"] for d in deltas)
        assert text == "".join(PIECES) == events[-4][1]["text"]
        assert events[-3][1]["part"]["text"] == text
        assert events[-2][1]["item"]["status"] == "completed"
        final = events[-1][1]["response"]
        assert final["id"] == created["id"] and final["status"] == "completed"
        assert final["output"][0]["content"][0]["text"] == text and final["output"][0]["id"] == item_id
        assert final["usage"]["output_tokens"] == len(PIECES)
        # Cut at max_output_tokens: response.incomplete, as OpenAI ends it.
        r = await client.post("/v1/responses", json={**body, "max_output_tokens": 2})
        events = _events(r.text)
        assert events[-1][0] == "response.incomplete"
        assert events[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
        assert events[-2][1]["item"]["status"] == "incomplete"


async def test_failure_mid_stream_is_response_failed(tmp_path: Path) -> None:
    async with with_worker(tmp_path, fail_after=2) as (_, client):
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "stream": True})
        assert r.status_code == 200
        events = _events(r.text)
        names = [n for n, _ in events]
        assert "response.output_text.delta" in names and names[-1] == "response.failed"
        failed = events[-1][1]["response"]
        assert failed["status"] == "failed" and failed["error"]["message"]
        assert "response.completed" not in names
        # Not streaming, the same failure is a status (nothing was said before it).
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "hi"})
        assert _error(r, r.status_code)["type"] == "server_error" and r.status_code >= 500


async def test_a_response_is_retrieved_from_the_history(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (_, client):
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2})
        made = r.json()
        got = await client.get(f"/v1/responses/{made['id']}")
        assert got.status_code == 200, got.text
        found = got.json()
        assert got.headers["x-rbee-job-id"] == r.headers["x-rbee-job-id"]
        for key in ("id", "object", "created_at", "status", "incomplete_details", "model", "output", "usage"):
            if key != "usage":
                assert found[key] == made[key], key
        assert found["usage"]["output_tokens"] == made["usage"]["output_tokens"]
        for missing in ("resp_00000000000000000000000000000000", "resp_nothex", "x"):
            error = _error(await client.get(f"/v1/responses/{missing}"), 404)
            assert error["param"] == "response_id"


async def test_a_client_that_leaves_cancels_its_job(tmp_path: Path) -> None:
    async with with_worker(tmp_path, delay_ms=200, pieces=["x"] * 100) as (app, client):
        body = {"model": MODEL, "input": "hi", "max_output_tokens": 90}
        task = asyncio.create_task(client.post("/v1/responses", json=body))
        registry = app.state.queen.registry
        for _ in range(200):
            if registry.live:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        [listed] = (await client.get("/v1/jobs")).json()["jobs"]
        job_id = listed.get("job_id") or listed["id"]
        for _ in range(100):
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
            if job["status"] not in ("running", "queued"):
                break
            await asyncio.sleep(0.05)
        assert job["status"] == "cancelled", job


# -- the edge ----------------------------------------------------------------------------


async def test_refusals_at_the_edge_use_openais_shape(tmp_path: Path) -> None:
    async with queen(tmp_path, token=TOKEN) as (_, client):
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "hi"})
        assert _error(r, 401)["code"] == "invalid_api_key"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = await client.post("/v1/responses", content=b"{}", headers={**auth, "Content-Type": "text/plain"})
        _error(r, 415)
        _error(await client.post("/v1/responses", content=b"x" * 1_500_000, headers={**auth, **JSON}), 413)
        _error(await client.get("/v1/responses/resp_x", headers={**auth, "Origin": "https://evil.example"}), 403)
        _error(await client.get("/v1/responses", headers=auth), 405)


async def test_unknown_v1_paths_are_404_in_each_apis_shape(client: httpx.AsyncClient) -> None:
    for path in ("/v1/nope", "/v1/audio/speech", "/v1/responses/x/input_items"):
        r = await client.post(path, json={})
        assert _error(r, 404)["code"] == "not_found", path
    r = await client.post("/v1/messages/nope", json={})
    assert r.status_code == 404 and r.json()["type"] == "error"
    for path in ("/v1/jobs/x/nope", "/v1/cluster/nope", "/nope"):
        r = await client.get(path)
        assert r.status_code == 404 and r.json()["error"]["kind"] == "not_found", path


async def test_preflight_from_an_allowed_origin_allows_the_sdks_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RBEE_ALLOW_ORIGINS", ORIGIN)
    asked = "authorization, content-type, x-api-key, anthropic-version, openai-beta, x-stainless-os, x-stainless-lang"
    async with queen(tmp_path, token=TOKEN) as (_, client):
        for path in ("/v1/responses", "/v1/chat/completions", "/v1/messages", "/v1/models", "/api/chat", "/v1/jobs"):
            r = await client.options(
                path,
                headers={
                    "Origin": ORIGIN,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": asked,
                },
            )
            assert r.status_code == 204, (path, r.text)
            assert r.headers["access-control-allow-origin"] == ORIGIN
            assert "POST" in r.headers["access-control-allow-methods"]
            allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
            assert {h.strip() for h in asked.split(",")} <= allowed, path
        # A foreign origin's preflight stays refused, in the path's shape.
        r = await client.options(
            "/v1/responses",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert _error(r, 403) and "access-control-allow-origin" not in r.headers
        # The allowed origin's page can read the job's id.
        r = await client.get("/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and "x-rbee-job-id" in r.headers["access-control-expose-headers"]


async def test_openapi_documents_the_responses_api(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    responses = schema["paths"]["/v1/responses"]["post"]["responses"]
    assert {"400", "404", "409", "413", "415", "429", "503"} <= set(responses)
    for status, response in responses.items():
        if status[0] in "45":
            assert response["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError"), status
    assert "404" in schema["paths"]["/v1/responses/{response_id}"]["get"]["responses"]


def test_a_workers_refusal_names_the_clients_field() -> None:
    from rbee.queen.responses import _end_error

    end = {"status": "failed", "error": {"kind": "invalid_operation", "message": "json_schema: cannot compile"}}
    r = _end_error(end, {})
    body = json.loads(bytes(r.body))
    assert r.status_code == 400 and body["error"]["param"] == "text.format"
    assert body["error"]["message"] == "text.format: cannot compile"
    other = {"status": "failed", "error": {"kind": "worker_lost", "message": "gone"}}
    assert _end_error(other, {}).status_code == 502

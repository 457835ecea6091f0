"""Fill in the middle through the queen: ``POST /infill`` in llama.cpp's shape and ``suffix`` on
OpenAI's completions, with the fake engine standing in for a model with (or without) FIM tokens."""

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
from httpx_sse import aconnect_sse

from rbee.queen.app import QueenSettings, create_queen_app
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(30)

MODEL = "qwen-coder"
MODEL_ID = "qwen2.5-coder-0.5b-q8_0"
PIECES = ["return", " a", " +", " b"]
BODY = {
    "model": MODEL,
    "input_prefix": "def add(a, b):\n    ",
    "input_suffix": "\n\nprint(add(1, 2))\n",
    "input_extra": [{"filename": "util.py", "text": "X = 1"}],
    "prompt": "",
}


@contextlib.asynccontextmanager
async def with_worker(
    tmp_path: Path, *, fim: bool = True, delay_ms: float = 0.0
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A queen whose one worker is a fake one in process."""
    engine = FakeEngine(model_id=MODEL_ID, pieces=PIECES, n_ctx=256, fim=fim, delay_ms=delay_ms)
    worker = create_worker_app(engine, WorkerSettings(worker_id="w1", aliases=[MODEL]))
    app = create_queen_app(QueenSettings(home=tmp_path))
    async with (
        worker.router.lifespan_context(worker),
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://queen") as client,
    ):
        app.state.queen.http._transport = httpx.ASGITransport(worker)
        app.state.queen.http.http1 = None  # every request through the worker app, not a socket
        await asyncio.wait_for(worker.state.worker.load_done.wait(), 10)
        report = {
            "worker_id": "w1",
            "model": MODEL_ID,
            "model_aliases": [MODEL],
            "state": "ready",
            "url": "http://worker",
            "n_ctx": 256,
        }
        beat = {"hive_id": "alpha", "url": "http://hive", "models": [{"id": MODEL_ID, "alias": MODEL}]}
        assert (await client.post("/v1/hives/heartbeat", json={**beat, "workers": [report]})).status_code == 200
        yield app, client


def _error(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    error: dict[str, Any] = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


async def test_infill_answers_llama_cpps_completion_object(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (app, client):
        r = await client.post("/infill", json={**BODY, "n_predict": 3, "prompt": "r"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["content"] == "return a +" and answer["stop"] is True
        assert answer["stop_type"] == "limit" and answer["tokens_predicted"] == 3
        assert answer["tokens_evaluated"] > 0 and answer["model"] == MODEL
        assert answer["timings"]["predicted_n"] == 3 and answer["has_new_line"] is False
        job = app.state.queen.registry.get(r.headers["x-rbee-job-id"])
        op = job.operation
        assert op.prompt == BODY["input_prefix"] + "r"  # llama.cpp's prompt starts the middle
        assert op.suffix == BODY["input_suffix"] and [(f.filename, f.text) for f in op.infill_files] == [
            ("util.py", "X = 1")
        ]
        assert (op.temperature, op.top_k, op.top_p) == (0.8, 40, 0.95)  # llama.cpp's defaults
        events = (await client.get(f"/v1/jobs/{job.id}/stream")).text
        assert "infill_request" in events
        # To the end: the script runs out before the context does.
        r = await client.post("/infill", json=BODY)
        assert r.json()["content"] == "".join(PIECES) and r.json()["stop_type"] == "eos"
        op = app.state.queen.registry.get(r.headers["x-rbee-job-id"]).operation
        assert op.to_the_context and op.max_tokens > 200


async def test_infill_streams_llama_cpps_chunks(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (_, client):
        chunks = []
        async with aconnect_sse(client, "POST", "/infill", json={**BODY, "stream": True, "n_predict": 4}) as source:
            assert source.response.headers["x-rbee-job-id"].startswith("job-")
            async for sse in source.aiter_sse():
                chunks.append(json.loads(sse.data))  # no [DONE]: every chunk is JSON
        *pieces, final = chunks
        assert [c["content"] for c in pieces] == PIECES and not any(c["stop"] for c in pieces)
        assert final["stop"] is True and final["content"] == ""  # the text was in the chunks
        assert final["tokens_predicted"] == 4


async def test_response_fields_pick_the_answer(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (_, client):
        fields = ["content", "timings/predicted_n", "tokens_cached", "nothing/here"]
        body = {**BODY, "n_predict": 2, "response_fields": fields, "cache_prompt": True, "samplers": ["top_k"]}
        body |= {"mirostat": 0, "n_probs": 0, "id_slot": -1}  # off: accepted
        r = await client.post("/infill", json={**body, "n_indent": 4, "t_max_predict_ms": 500, "t_max_prompt_ms": 500})
        assert r.status_code == 200, r.text
        assert set(r.json()) == {"content", "timings/predicted_n", "tokens_cached"}
        assert r.json()["content"] == "return a" and r.json()["timings/predicted_n"] == 2


@pytest.mark.parametrize("n_predict", [None, 4])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_model_without_fim_tokens_is_a_400_naming_input_suffix(
    tmp_path: Path, n_predict: int | None, stream: bool
) -> None:
    # Without n_predict the queen counts the prompt on the worker before the job; with it, the
    # worker refuses the job it is given. Either way nothing is streamed and the answer is 400.
    async with with_worker(tmp_path, fim=False) as (_, client):
        body = {**BODY, "stream": stream} | ({"n_predict": n_predict} if n_predict else {})
        error = _error(await client.post("/infill", json=body))
        assert error["param"] == "input_suffix" and "fill-in-the-middle" in error["message"]
        assert error["message"].startswith("input_suffix: ")
        completion = {"model": MODEL, "prompt": "def f(", "suffix": "):", "stream": stream} | (
            {"max_tokens": n_predict} if n_predict else {"n_predict": -1}
        )
        error = _error(await client.post("/v1/completions", json=completion))
        assert error["param"] == "suffix" and "fill-in-the-middle" in error["message"]


async def test_suffix_on_completions_is_fill_in_the_middle(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (app, client):
        r = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "def f(", "suffix": "):", "max_tokens": 2}
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "return a"
        op = app.state.queen.registry.get(r.headers["x-rbee-job-id"]).operation
        assert (op.prompt, op.suffix) == ("def f(", "):")


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"input_prefix": 3}, "input_prefix", "invalid_operation"),
        ({"input_suffix": ["x"]}, "input_suffix", "invalid_operation"),
        ({"input_extra": [{"filename": "a"}]}, "input_extra[0].text", "invalid_operation"),
        ({"input_extra": "x"}, "input_extra", "invalid_operation"),
        ({"input_prefix": "a\x00b"}, "input_prefix", "invalid_operation"),
        ({"n_predict": 0}, "n_predict", "invalid_operation"),
        ({"temperature": 5}, "temperature", "invalid_operation"),
        ({"stream": "yes"}, "stream", "invalid_operation"),
        ({"response_fields": "content"}, "response_fields", "invalid_operation"),
        ({"frobnicate": 1}, "frobnicate", "unknown_parameter"),
        ({"mirostat": 2}, "mirostat", "unsupported_parameter"),
        ({"n_probs": 3}, "n_probs", "unsupported_parameter"),
    ],
)
async def test_bad_input_is_a_400_naming_the_field(
    tmp_path: Path, fields: dict[str, Any], param: str, code: str
) -> None:
    async with with_worker(tmp_path) as (app, client):
        error = _error(await client.post("/infill", json={**BODY, **fields}))
        assert (error["param"], error["code"]) == (param, code), error
        assert app.state.queen.registry.list() == []  # no job was made


async def test_a_client_that_leaves_cancels_its_infill(tmp_path: Path) -> None:
    async with with_worker(tmp_path, delay_ms=200) as (app, client):
        task = asyncio.create_task(client.post("/infill", json={**BODY, "n_predict": 4}))
        registry = app.state.queen.registry
        for _ in range(200):
            if registry.live:
                break
            await asyncio.sleep(0.01)
        [job] = registry.list()
        await asyncio.sleep(0.3)  # a token or two generated
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(100):
            if job.done:
                break
            await asyncio.sleep(0.05)
        assert job.status.value == "cancelled"

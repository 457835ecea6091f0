"""The queen's /tokenize, /detokenize and /v1/embeddings, forwarded to a fake worker in process
(the scripted engine's fake tokens and fake embeddings): shapes, refusals in OpenAI's shape, no
worker ready."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rbee.queen.app import QueenSettings, create_queen_app
from rbee.worker.app import MAX_EMBED_INPUTS, WorkerSettings, create_worker_app
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(30)

MODEL = "gemma3-270m"
MODEL_ID = "gemma-3-270m-q4_k_m"
WORKER_TOKEN = "worker-token-0123456789"


@contextlib.asynccontextmanager
async def queen(home: Path) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_queen_app(QueenSettings(home=home))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://queen") as client,
    ):
        yield app, client


def _beat(workers: list[dict[str, Any]] | None = None, tokens: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "hive_id": "alpha",
        "url": "http://hive",
        "models": [{"id": MODEL_ID, "alias": MODEL}],
        "workers": workers or [],
        "worker_tokens": tokens or {},
    }


@contextlib.asynccontextmanager
async def with_worker(tmp_path: Path, state: str = "ready") -> AsyncIterator[tuple[FakeEngine, httpx.AsyncClient]]:
    """A queen whose one worker is a fake one in process, reached with the worker's own token."""
    engine = FakeEngine(model_id=MODEL_ID, n_ctx=64)
    worker = create_worker_app(engine, WorkerSettings(worker_id="w1", aliases=[MODEL], token=WORKER_TOKEN))
    async with worker.router.lifespan_context(worker), queen(tmp_path) as (app, client):
        http = app.state.queen.http
        http._transport = httpx.ASGITransport(worker)
        await asyncio.wait_for(worker.state.worker.load_done.wait(), 10)  # the model is loaded
        report = {"worker_id": "w1", "model": MODEL_ID, "model_aliases": [MODEL], "state": state}
        report |= {"url": "http://worker", "n_ctx": 64}
        beat = _beat([report], {"w1": WORKER_TOKEN})
        assert (await client.post("/v1/hives/heartbeat", json=beat)).status_code == 200
        yield engine, client


def _error(r: httpx.Response, status: int, param: str | None) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    message: str = error["message"]
    return message


@pytest.mark.parametrize("prefix", ["", "/v1"])
async def test_tokenize_and_detokenize_are_the_workers(tmp_path: Path, prefix: str) -> None:
    async with with_worker(tmp_path) as (engine, client):
        r = await client.post(f"{prefix}/tokenize", json={"content": "one two three"})
        assert r.status_code == 200, r.text
        assert r.json() == {"tokens": engine.tokenize("one two three")}
        r = await client.post(f"{prefix}/tokenize", json={"model": MODEL, "content": "a b", "with_pieces": True})
        assert r.json() == {"tokens": [{"id": t, "piece": engine.pieces[t]} for t in engine.tokenize("a b")]}
        r = await client.post(f"{prefix}/tokenize", json={"model": MODEL_ID, "content": "a", "add_special": True})
        assert r.json()["tokens"][0] == 0
        r = await client.post(f"{prefix}/detokenize", json={"tokens": [1, 2]})
        assert r.json() == {"content": "tok1 tok2 "}


async def test_tokenizer_refusals_name_the_field(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (_, client):
        message = _error(await client.post("/detokenize", json={"tokens": [1, 10_000]}), 400, "tokens")
        assert message.startswith("tokens[1]: 10000 is not a token")
        _error(await client.post("/detokenize", json={"tokens": ["a"]}), 400, "tokens[0]")
        _error(await client.post("/tokenize", json={"content": 5}), 400, "content")
        _error(await client.post("/tokenize", json={}), 400, "content")
        _error(await client.post("/tokenize", json={"content": "x", "model": 3}), 400, "model")
        _error(await client.post("/tokenize", json=["x"]), 400, None)
        _error(
            await client.post("/tokenize", content=b"{oops", headers={"content-type": "application/json"}), 400, None
        )


async def test_no_ready_worker_is_a_503_and_an_unknown_model_a_404(tmp_path: Path) -> None:
    async with queen(tmp_path) as (_, client):
        for path, body in (("/tokenize", {"content": "x"}), ("/v1/embeddings", {"input": "x", "model": MODEL})):
            message = _error(await client.post(path, json=body), 503, None)
            assert "no worker of 'gemma3-270m' is ready" in message and "does not start one" in message
        await client.post("/v1/hives/heartbeat", json=_beat())
        assert "is ready" in _error(await client.post("/detokenize", json={"tokens": [1]}), 503, None)
        message = _error(await client.post("/v1/embeddings", json={"input": "x", "model": "nope"}), 404, "model")
        assert "nope" in message


async def test_a_loading_worker_is_not_asked(tmp_path: Path) -> None:
    async with with_worker(tmp_path, state="loading") as (_, client):
        _error(await client.post("/tokenize", json={"content": "x"}), 503, None)


async def test_embeddings_have_openais_shape(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (engine, client):
        r = await client.post("/v1/embeddings", json={"model": MODEL, "input": ["a b", "c"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == MODEL_ID
        assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}  # the fake BOS, then one per word
        expected = engine.embed([[0, *engine.tokenize("a b")], [0, *engine.tokenize("c")]])
        assert body["data"] == [
            {"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(expected)
        ]
        one = (await client.post("/v1/embeddings", json={"model": MODEL, "input": "c"})).json()
        assert one["data"][0]["embedding"] == expected[1]
        ids = (await client.post("/v1/embeddings", json={"model": MODEL, "input": [3, 4]})).json()
        assert ids["data"][0]["embedding"] == engine.embed([[3, 4]])[0]
        assert ids["usage"]["prompt_tokens"] == 2
        lists = (await client.post("/v1/embeddings", json={"model": MODEL, "input": [[3, 4], [5]]})).json()
        assert [d["embedding"] for d in lists["data"]] == engine.embed([[3, 4], [5]])


async def test_base64_is_little_endian_float32(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (engine, client):
        body = {"model": MODEL, "input": "c", "encoding_format": "base64", "dimensions": engine.n_embd}
        r = await client.post("/v1/embeddings", json=body)
        assert r.status_code == 200, r.text
        raw = base64.b64decode(r.json()["data"][0]["embedding"])
        decoded = struct.unpack(f"<{engine.n_embd}f", raw)
        expected = engine.embed([[0, *engine.tokenize("c")]])[0]
        assert decoded == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({}, "input", "is required"),
        ({"input": []}, "input", "at least one input"),
        ({"input": ""}, "input[0]", "empty"),
        ({"input": 3}, "input", "must be a string"),
        ({"input": ["a", 3]}, "input[1]", "must be a string or a list of token ids"),
        ({"input": [[1], ["a"]]}, "input[1]", "must be a string or a list of token ids"),
        ({"input": [1, 999]}, "input[0]", "999 is not a token"),
        ({"input": ["a"] * (MAX_EMBED_INPUTS + 1)}, "input", f"at most {MAX_EMBED_INPUTS}"),
        ({"input": [" ".join(["w"] * 64)]}, "input[0]", "the embedding context holds 64"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", "must be 'float' or 'base64'"),
        ({"input": "a", "dimensions": 4}, "dimensions", "gives 8-dimensional embeddings"),
        ({"input": "a", "dimensions": "8"}, "dimensions", "positive integer"),
        ({"input": "a", "model": ""}, "model", "model's name"),
    ],
)
async def test_embeddings_refusals_are_400_naming_the_param(
    tmp_path: Path, body: dict[str, Any], param: str, says: str
) -> None:
    async with with_worker(tmp_path) as (_, client):
        message = _error(await client.post("/v1/embeddings", json={"model": MODEL, **body}), 400, param)
        assert says in message, message

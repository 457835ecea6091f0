"""The worker's /tokenize, /detokenize and /v1/embeddings, with the scripted engine's fake
tokens and fake embeddings: shapes, and refusals naming the field."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from rbee.worker.app import MAX_EMBED_INPUTS, WorkerSettings, create_worker_app
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(30)


@contextlib.asynccontextmanager
async def worker(engine: FakeEngine | None = None, *, wait: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    engine = engine or FakeEngine(n_ctx=64)
    app = create_worker_app(engine, WorkerSettings(worker_id="worker-test"))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as client,
    ):
        if wait:
            async with asyncio.timeout(10):
                while True:
                    if (await client.get("/v1/ready")).json()["ready"]:
                        break
                    await asyncio.sleep(0.01)
        yield client


async def test_tokenize_gives_ids_and_pieces_and_special_tokens_only_when_asked() -> None:
    engine = FakeEngine(n_ctx=64)
    async with worker(engine) as client:
        plain = (await client.post("/tokenize", json={"content": "one two three"})).json()
        assert plain == {"tokens": engine.tokenize("one two three")}
        assert len(plain["tokens"]) == 3
        special = (await client.post("/tokenize", json={"content": "one two", "add_special": True})).json()
        assert special["tokens"] == [0, *engine.tokenize("one two")]
        pieces = (await client.post("/tokenize", json={"content": "one two", "with_pieces": True})).json()
        assert pieces == {"tokens": [{"id": t, "piece": engine.pieces[t]} for t in engine.tokenize("one two")]}


async def test_detokenize_gives_the_text_and_names_an_id_outside_the_vocabulary() -> None:
    engine = FakeEngine(n_ctx=64)
    async with worker(engine) as client:
        resp = await client.post("/detokenize", json={"tokens": [1, 2, 3]})
        assert resp.json() == {"content": "tok1 tok2 tok3 "}
        assert (await client.post("/detokenize", json={"tokens": []})).json() == {"content": ""}
        for bad in (engine.n_vocab, -1):
            resp = await client.post("/detokenize", json={"tokens": [1, bad]})
            assert resp.status_code == 422
            error = resp.json()["error"]
            assert error["field"] == "tokens"
            assert error["message"].startswith(f"tokens[1]: {bad} is not a token")
        resp = await client.post("/detokenize", json={"tokens": "1 2"})
        assert resp.status_code == 422 and resp.json()["error"]["field"] == "tokens"


async def test_tokens_before_the_model_is_loaded_are_a_503() -> None:
    gate = threading.Event()
    async with worker(FakeEngine(load_gate=gate), wait=False) as client:
        try:
            for path, body in (
                ("/tokenize", {"content": "x"}),
                ("/detokenize", {"tokens": [1]}),
                ("/v1/embeddings", {"input": ["x"]}),
            ):
                resp = await client.post(path, json=body)
                assert resp.status_code == 503, (path, resp.text)
                assert "has not loaded" in resp.json()["error"]["message"]
        finally:
            gate.set()


async def test_embeddings_are_fake_unit_vectors_one_per_input_in_order() -> None:
    engine = FakeEngine(n_ctx=64)
    async with worker(engine) as client:
        resp = await client.post("/v1/embeddings", json={"input": ["a b", "c", [3, 4, 5]]})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["model"] == "fake-model" and body["n_embd"] == engine.n_embd
        assert body["prompt_tokens"] == 3 + 2 + 3  # the texts get the fake BOS
        assert len(body["data"]) == 3
        for vector in body["data"]:
            assert len(vector) == engine.n_embd
            assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0)
        assert body["data"] == engine.embed([[0, *engine.tokenize("a b")], [0, *engine.tokenize("c")], [3, 4, 5]])
        one = (await client.post("/v1/embeddings", json={"input": ["c"]})).json()
        assert one["data"][0] == body["data"][1]
        same = (await client.post("/v1/embeddings", json={"input": ["a b"], "dimensions": engine.n_embd})).json()
        assert same["data"][0] == body["data"][0]


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"input": []}, "input", "at least one input"),
        ({"input": [""]}, "input[0]", "empty"),
        ({"input": ["a", []]}, "input[1]", "empty"),
        ({"input": ["a", [1, 999]]}, "input[1]", "999 is not a token"),
        ({"input": [" ".join(["w"] * 64)]}, "input[0]", "65 tokens; the embedding context holds 64"),
        ({"input": ["a"], "dimensions": 4}, "dimensions", "gives 8-dimensional embeddings"),
        ({"input": ["a"] * (MAX_EMBED_INPUTS + 1)}, "input", ""),
        ({"input": "a"}, "input", ""),
    ],
)
async def test_embeddings_refuse_bad_input_naming_the_field(body: dict[str, Any], field: str, says: str) -> None:
    async with worker() as client:
        resp = await client.post("/v1/embeddings", json=body)
        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["field"] == field
        assert says in error["message"]


async def test_embeddings_run_off_the_event_loop() -> None:
    class Slow(FakeEngine):
        def embed(self, inputs: Any) -> list[list[float]]:
            self.thread = threading.current_thread().name
            gate.wait(5)
            return super().embed(inputs)

    gate = threading.Event()
    engine = Slow(n_ctx=64)
    async with worker(engine) as client:
        pending = asyncio.create_task(client.post("/v1/embeddings", json={"input": ["a"]}))
        await asyncio.sleep(0.05)
        # The loop still answers while the embedding is being computed.
        assert (await client.get("/health")).status_code == 200
        gate.set()
        assert (await pending).status_code == 200
        assert engine.thread.startswith("rbee-embed")

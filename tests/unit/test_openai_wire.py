"""The bytes of the streams the queen's APIs write, pinned: an OpenAI chat with usage, a
completion, a forced tool call the model did not make (its text, as text), a Responses API
stream and an Anthropic Messages stream, each frame by frame.

``recorded/openai_streams.json`` was written by the sse-starlette streams these replaced;
ids, times and the fingerprint are masked, everything else must match byte for byte
(headers included).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee.queen.app import QueenSettings, create_queen_app
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(30)

MODEL = "gemma3-270m"
MODEL_ID = "gemma-3-270m-q4_k_m"
CHAT = [{"role": "user", "content": "hi"}]
RECORDED = json.loads((Path(__file__).parent / "recorded" / "openai_streams.json").read_text())
REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 5, "stream_options": {"include_usage": True}}),
    "completion": ("/v1/completions", {"prompt": "x", "max_tokens": 4}),
    "tool_call": (
        "/v1/chat/completions",
        {
            "messages": CHAT,
            "max_tokens": 6,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": "required",
        },
    ),
    "responses": ("/v1/responses", {"input": "hi", "max_output_tokens": 5}),
    "anthropic": ("/v1/messages", {"messages": CHAT, "max_tokens": 5}),
}


def masked(text: str) -> str:
    text = re.sub(r"(chatcmpl|cmpl)-[0-9a-f]+", r"\1-ID", text)
    text = re.sub(r'"created":\d+', '"created":0', text)
    text = re.sub(r'"system_fingerprint":"[^"]*"', '"system_fingerprint":"FP"', text)
    text = re.sub(r'"id":"call_[0-9a-f]+"', '"id":"call_ID"', text)
    text = re.sub(r'"(resp|msg)_[0-9a-zA-Z]+"', r'"\1_ID"', text)
    return re.sub(r'"created_at":[0-9.]+', '"created_at":0', text)


@contextlib.asynccontextmanager
async def queen(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A queen whose one worker is a fake one in process, answering three pieces."""
    engine = FakeEngine(model_id=MODEL_ID, pieces=["Hello", " there", ", \u00e9\n"], n_ctx=256)
    worker = create_worker_app(engine, WorkerSettings(worker_id="w1", aliases=[MODEL]))
    app = create_queen_app(QueenSettings(home=tmp_path))
    async with (
        worker.router.lifespan_context(worker),
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://queen") as client,
    ):
        app.state.queen.http._transport = httpx.ASGITransport(worker)
        app.state.queen.http.http1 = None
        await asyncio.wait_for(worker.state.worker.load_done.wait(), 10)
        report = {"worker_id": "w1", "model": MODEL_ID, "model_aliases": [MODEL], "state": "ready"}
        beat = {
            "hive_id": "alpha",
            "url": "http://hive",
            "models": [{"id": MODEL_ID, "alias": MODEL}],
            "workers": [{**report, "url": "http://worker", "n_ctx": 256}],
        }
        assert (await client.post("/v1/hives/heartbeat", json=beat)).status_code == 200
        yield client


@pytest.mark.parametrize("name", sorted(REQUESTS))
async def test_a_stream_is_the_recorded_bytes(tmp_path: Path, name: str) -> None:
    path, body = REQUESTS[name]
    async with queen(tmp_path) as client:
        r = await client.post(path, json={"model": MODEL, "stream": True, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    recorded = RECORDED[name]
    assert r.headers["content-type"] == recorded["content-type"]
    assert r.headers["cache-control"] == recorded["cache-control"]
    assert masked(r.text).split("\n\n") == recorded["body"].split("\n\n")

"""Defaults and parameters as OpenAI's and llama.cpp's servers have them: a chat without
max_tokens runs to the end of the context, form feeds, many turns, ``context_length_exceeded``,
``n_predict``, and body parameters rbee does not use said so. The fake engine stands in
for the model (it counts a token a word)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rbee.contracts.operations import LIMITS
from rbee.errors import InvalidOperation
from rbee.queen import openai as api
from rbee.queen.app import QueenSettings, create_queen_app
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.engine import FakeEngine

pytestmark = pytest.mark.timeout(30)

MODEL = "gemma3-270m"
MODEL_ID = "gemma-3-270m-q4_k_m"
CHAT = [{"role": "user", "content": "hi"}]
PIECES = ["Hello", " there"]
N_CTX = 64


@contextlib.asynccontextmanager
async def with_worker(tmp_path: Path, n_ctx: int = N_CTX) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A queen whose one worker is a fake one in process."""
    worker = create_worker_app(
        FakeEngine(model_id=MODEL_ID, pieces=PIECES, n_ctx=n_ctx), WorkerSettings(worker_id="w1", aliases=[MODEL])
    )
    app = create_queen_app(QueenSettings(home=tmp_path))
    async with (
        worker.router.lifespan_context(worker),
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://queen") as client,
    ):
        app.state.queen.http._transport = httpx.ASGITransport(worker)
        await asyncio.wait_for(worker.state.worker.load_done.wait(), 10)  # the model is loaded
        report = {
            "worker_id": "w1",
            "model": MODEL_ID,
            "model_aliases": [MODEL],
            "state": "ready",
            "url": "http://worker",
            "n_ctx": n_ctx,
        }
        beat = {
            "hive_id": "alpha",
            "url": "http://hive",
            "models": [{"id": MODEL_ID, "alias": MODEL}],
            "workers": [report],
        }
        assert (await client.post("/v1/hives/heartbeat", json=beat)).status_code == 200
        yield app, client


def _parse(chat: bool = True, **fields: Any) -> api._Call:
    base = {"messages": CHAT} if chat else {"prompt": "x"}
    return api._parse({"model": "m", **base, **fields}, chat=chat)


# -- requests ---------------------------------------------------------------------


def test_max_tokens_defaults_and_n_predict() -> None:
    assert _parse().to_the_context and _parse().op.max_tokens == api.DEFAULT_CHAT_MAX_TOKENS
    assert not _parse(max_tokens=5).to_the_context
    assert not _parse(chat=False).to_the_context and _parse(chat=False).op.max_tokens == 16
    assert _parse(n_predict=7).op.max_tokens == 7 and not _parse(n_predict=7).to_the_context
    assert _parse(chat=False, n_predict=-1).to_the_context
    assert _parse(max_tokens=3, n_predict=9).op.max_tokens == 3
    with pytest.raises(InvalidOperation) as caught:
        _parse(n_predict=0)
    assert caught.value.field == "n_predict"


def test_a_form_feed_and_a_vertical_tab_are_accepted_other_controls_not() -> None:
    assert (_parse(messages=[{"role": "user", "content": "page 1\fpage 2"}]).op.messages or [])[0].content.count("\f")
    assert "\f" in (_parse(chat=False, prompt="a\fb").op.prompt or "")
    assert "\x0b" in (_parse(chat=False, prompt="a\x0bb").op.prompt or "")
    for bad in ("a\x00b", "a\x07b", "a\u202eb"):  # NUL, a bell, a bidi override
        with pytest.raises(InvalidOperation):
            _parse(messages=[{"role": "user", "content": bad}])


def test_many_turns_are_bounded_by_their_characters_not_their_count() -> None:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "ok"} for i in range(5_001)]
    assert len(_parse(messages=turns).op.messages or []) == 5_001
    assert LIMITS.messages >= 100_000
    with pytest.raises(InvalidOperation):
        _parse(messages=[{"role": "user", "content": "x" * (LIMITS.prompt_chars + 1)}])


def test_unknown_parameters_are_listed() -> None:
    call = _parse(user="u1", cache_prompt=True, temperature=0.5, **{"bad name\n": 1})
    assert call.ignored == ("bad_name_", "cache_prompt", "user")
    assert _parse().ignored == ()


# -- through a queen -------------------------------------------------------------------


async def test_a_chat_without_max_tokens_gets_the_rest_of_the_context(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (app, client):
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        job = app.state.queen.registry.get(r.headers["x-rbee-job-id"])
        assert job.operation.max_tokens == N_CTX - usage["prompt_tokens"]
        # Given, it is kept.
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 3})
        assert app.state.queen.registry.get(r.headers["x-rbee-job-id"]).operation.max_tokens == 3


async def test_an_over_long_prompt_is_context_length_exceeded(tmp_path: Path) -> None:
    long = "word " * (N_CTX + 10)
    async with with_worker(tmp_path) as (_, client):
        for path, body, param in (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": long}]}, "messages"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": long}], "max_tokens": 4}, "messages"),
            ("/v1/completions", {"prompt": long, "max_tokens": 4}, "prompt"),
            ("/v1/completions", {"prompt": long, "n_predict": -1}, "prompt"),
        ):
            r = await client.post(path, json={"model": MODEL, **body})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "context_length_exceeded" and error["param"] == param, (path, body, error)
            assert error["type"] == "invalid_request_error"
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": N_CTX})
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens", error


async def test_ignored_parameters_are_said_in_a_header_and_the_narration(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (_, client):
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "user": "u1", "cache_prompt": True}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.headers["x-rbee-ignored-params"] == "cache_prompt,user"
        events = (await client.get(f"/v1/jobs/{r.headers['x-rbee-job-id']}/stream")).text
        assert "openai_ignored" in events and "cache_prompt" in events
        plain = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2})
        assert "x-rbee-ignored-params" not in plain.headers
        refused = await client.post("/v1/chat/completions", json={**body, "temperature": 9})
        assert refused.status_code == 400 and refused.headers["x-rbee-ignored-params"] == "cache_prompt,user"

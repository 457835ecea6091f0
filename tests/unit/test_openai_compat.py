"""Defaults and parameters as OpenAI's and llama.cpp's servers have them: a chat without
max_tokens runs to the end of the context, form feeds, many turns, ``context_length_exceeded``,
``n_predict``, and body parameters as OpenAI takes them: unknown ones refused by name, ones
rbee cannot honour refused saying why, informational ones accepted. The fake engine stands
in for the model (it counts a token a word)."""

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
from rbee.queen.app import QueenSettings, create_queen_app
from rbee.queen.openai import routes, schema
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.fake import FakeEngine

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
        app.state.queen.http.http1 = None  # every request through the worker app, not a socket
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


def _parse(chat: bool = True, **fields: Any) -> schema.Call:
    base = {"messages": CHAT} if chat else {"prompt": "x"}
    return schema.parse({"model": "m", **base, **fields}, chat=chat)


# -- requests ---------------------------------------------------------------------


def test_max_tokens_defaults_and_n_predict() -> None:
    assert _parse().to_the_context and _parse().op.max_tokens == schema.DEFAULT_CHAT_MAX_TOKENS
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


@pytest.mark.parametrize("chat", [True, False])
def test_an_unknown_parameter_is_refused_by_name(chat: bool) -> None:
    with pytest.raises(InvalidOperation) as caught:
        _parse(chat=chat, temperature=0.5, frobnicate=True)
    assert caught.value.field == "frobnicate" and caught.value.data["code"] == "unknown_parameter"
    assert caught.value.message == "Unrecognized request argument supplied: frobnicate"
    with pytest.raises(InvalidOperation) as caught:
        _parse(chat=chat, **{"bad name\n": 1, "other": 2})
    assert caught.value.message == "Unrecognized request arguments supplied: bad name?, other"


@pytest.mark.parametrize(
    ("chat", "param"),
    [
        (True, "suffix"),
        (True, "best_of"),
        (True, "echo"),
        (False, "tools"),
        (False, "messages"),
        (False, "tool_choice"),
    ],
)
def test_another_endpoints_parameter_is_unknown(chat: bool, param: str) -> None:
    with pytest.raises(InvalidOperation) as caught:
        _parse(chat=chat, **{param: "x"})
    assert caught.value.field == param and caught.value.data["code"] == "unknown_parameter"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"store": True}, "store"),
        ({"mirostat": 2}, "mirostat"),
        ({"ignore_eos": True}, "ignore_eos"),  # not 1: booleans are not numbers here
        ({"typical_p": 0.5}, "typical_p"),
        ({"functions": []}, "functions"),
    ],
)
def test_a_parameter_rbee_cannot_honour_is_refused_saying_why(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidOperation) as caught:
        _parse(**fields)
    assert caught.value.field == param and caught.value.data["code"] == "unsupported_parameter"
    assert caught.value.message.startswith(f"{param}: ") and len(caught.value.message) > len(param) + 12


def test_informational_and_llama_cpp_parameters_are_accepted() -> None:
    informational = {
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "parallel_tool_calls": True,
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "modalities": ["text"],
        "audio": None,
        "cache_prompt": True,
        "stream_options": {"include_usage": True},
        # llama.cpp's samplers rbee lacks, off; and the hints its clients send.
        "mirostat": 0,
        "typical_p": 1.0,
        "ignore_eos": False,
        "n_probs": 0,
        "samplers": ["top_k", "top_p"],
        "t_max_predict_ms": 500,
    }
    assert _parse(**informational).op.messages is not None
    call = _parse(grammar='root ::= "a"', n_predict=3, min_p=0.1, repeat_penalty=1.1, top_k=5)
    assert (call.op.grammar, call.op.max_tokens, call.op.min_p, call.op.repeat_penalty, call.op.top_k) == (
        'root ::= "a"',
        3,
        0.1,
        1.1,
        5,
    )
    assert _parse(chat=False, suffix="}", user="u1", best_of=1, echo=False).op.suffix == "}"
    assert _parse(chat=False, suffix="").op.suffix is None  # OpenAI's default is no suffix


# -- through a queen -------------------------------------------------------------------


async def test_a_chat_without_max_tokens_gets_the_rest_of_the_context(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (app, client):
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        job = app.state.queen.registry.get(r.headers["x-rbee-job-id"])
        assert job.operation.max_tokens == N_CTX - usage["prompt_tokens"] and job.operation.to_the_context
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


async def test_an_unknown_parameter_is_openais_400(tmp_path: Path) -> None:
    async with with_worker(tmp_path) as (app, client):
        jobs_before = len(app.state.queen.registry.list())
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "user": "u1", "foo": 1}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        assert r.json() == {
            "error": {
                "message": "Unrecognized request argument supplied: foo",
                "type": "invalid_request_error",
                "param": "foo",
                "code": "unknown_parameter",
            }
        }
        assert "x-rbee-ignored-params" not in r.headers and "x-rbee-job-id" not in r.headers
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "audio": {"voice": "x"}})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "audio" and error["code"] == "unsupported_parameter"
        assert len(app.state.queen.registry.list()) == jobs_before  # no job was made
        r = await client.post("/v1/chat/completions", json={**body, "foo": None})
        assert r.status_code == 400  # a null unknown parameter is still unknown
        del body["foo"]
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text


async def test_a_first_chat_with_no_worker_yet_runs_to_the_context(tmp_path: Path) -> None:
    """With no worker to count against, the job says so and its worker bounds it by its own context."""
    app = create_queen_app(QueenSettings(home=tmp_path))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://queen") as client,
    ):
        beat = {"hive_id": "alpha", "url": "http://hive", "models": [{"id": MODEL_ID, "alias": MODEL}], "workers": []}
        assert (await client.post("/v1/hives/heartbeat", json=beat)).status_code == 200
        call = schema.parse({"model": MODEL, "messages": CHAT}, chat=True)
        op = (await routes._to_the_context(app.state.queen, call)).op
        assert op.to_the_context and op.max_tokens == schema.DEFAULT_CHAT_MAX_TOKENS
        given = schema.parse({"model": MODEL, "messages": CHAT, "max_tokens": 7}, chat=True)
        assert not (await routes._to_the_context(app.state.queen, given)).op.to_the_context

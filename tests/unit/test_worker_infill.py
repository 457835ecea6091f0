"""Fill in the middle at the worker, with the scripted engine: the operation's fields, the
worker's refusal for a model without FIM tokens, and ``--override-kv``'s parser.

The real model's FIM prompt layout is in tests/e2e/test_infill_model.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from pydantic import ValidationError

from rbee.contracts.operations import Infer
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.engine import parse_kv_override
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(30)


async def _worker(engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    app = create_worker_app(engine, WorkerSettings(worker_id="worker-test"))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as client,
    ):
        await asyncio.wait_for(app.state.worker.load_done.wait(), 10)  # the model is loaded
        yield client


@pytest.fixture
async def fim() -> AsyncIterator[tuple[httpx.AsyncClient, FakeEngine]]:
    engine = FakeEngine(tokens=4, fim=True)
    async for client in _worker(engine):
        yield client, engine


@pytest.fixture
async def plain() -> AsyncIterator[httpx.AsyncClient]:
    async for client in _worker(FakeEngine(tokens=4)):
        yield client


def _op(**fields: Any) -> dict[str, Any]:
    return {"operation": "infer", "model": "fake-model", "prompt": "def f(x):", "max_tokens": 4, **fields}


async def test_suffix_and_files_reach_the_engine_and_the_prompt_is_the_fim_prompt(
    fim: tuple[httpx.AsyncClient, FakeEngine],
) -> None:
    client, engine = fim
    files = [{"filename": "util.py", "text": "x = 1"}]
    r = await client.post("/v1/jobs", json=_op(suffix="return y", infill_files=files))
    assert r.status_code == 201, r.text
    async with aconnect_sse(client, "GET", f"/v1/jobs/{r.json()['job_id']}/stream") as source:
        events = [(s.event, s.data) for s in [e async for e in source.aiter_sse()]]
    end = json.loads(next(data for kind, data in events if kind == "end"))
    assert end["status"] == "completed"
    req = engine.last_request
    assert req is not None
    assert (req.prompt, req.suffix, req.infill_files) == ("def f(x):", "return y", [("util.py", "x = 1")])
    # The fake FIM prompt: three markers around the words of the file, prefix and suffix.
    assert end["tokens_in"] == len(engine.infill_tokens("def f(x):", "return y", [("util.py", "x = 1")])) == 11


async def test_a_model_without_fim_tokens_refuses_at_post_naming_suffix(plain: httpx.AsyncClient) -> None:
    r = await plain.post("/v1/jobs", json=_op(suffix="return y"))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "suffix"
    assert "no fill-in-the-middle tokens" in error["message"]
    # Nothing was started: the worker's job list is empty.
    assert (await plain.post("/v1/jobs", json=_op())).status_code == 201


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "prompt": None, "suffix": "x"}, "not messages"),
        ({"infill_files": [{"filename": "a", "text": "b"}]}, "only with suffix"),
        ({"suffix": "a\x00b"}, "control character"),
        ({"suffix": "x" * 100_001}, "at most"),
        ({"suffix": "y", "infill_files": [{"text": "z", "size": 1}]}, "Extra inputs"),
    ],
)
def test_bad_fill_in_the_middle_fields_are_refused(fields: dict[str, Any], needle: str) -> None:
    body = {k: v for k, v in _op(**fields).items() if v is not None}
    with pytest.raises(ValidationError, match=needle):
        Infer.model_validate(body)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("tokenizer.ggml.fim_pre_token_id=int:6", ("tokenizer.ggml.fim_pre_token_id", 6)),
        ("a.b=float:0.5", ("a.b", 0.5)),
        ("a.b=bool:true", ("a.b", True)),
        ("a.b=str:x:y", ("a.b", "x:y")),
    ],
)
def test_override_kv_parses_llama_cpp_syntax(text: str, parsed: tuple[str, Any]) -> None:
    assert parse_kv_override(text) == parsed


@pytest.mark.parametrize(
    "text", ["nokind", "a=int", "a=list:1", "a=int:x", "a=bool:yes", "=int:1", "a=str:" + "x" * 200]
)
def test_override_kv_refuses_what_llama_cpp_would_not_take(text: str) -> None:
    with pytest.raises(ValueError, match=r"KEY=TYPE:VALUE|is not a|true or false|at most 127"):
        parse_kv_override(text)

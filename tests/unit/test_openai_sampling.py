"""Structured output, log-probabilities, penalties and logit bias: the OpenAI request
fields, the Infer operation they become, the worker's admission and the answers' shapes.

The real model's behaviour (output that parses, logprobs that add up) is in
tests/e2e/test_openai_sampling_model.py; here the scripted engine stands in.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from rbee import __version__
from rbee.contracts.operations import Infer, parse_operation
from rbee.errors import InvalidOperation
from rbee.queen.openai import errors as openai_errors
from rbee.queen.openai import format as openai_format
from rbee.queen.openai import schema
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.engine import schema_grammar
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(30)

CHAT = [{"role": "user", "content": "hi"}]


def _chat(**fields: Any) -> Infer:
    return schema.parse({"model": "m", "messages": CHAT, **fields}, chat=True).op


def _completion(**fields: Any) -> Infer:
    return schema.parse({"model": "m", "prompt": "x", **fields}, chat=False).op


def _refused(fields: dict[str, Any], chat: bool = True) -> str | None:
    body = {"model": "m", **({"messages": CHAT} if chat else {"prompt": "x"}), **fields}
    with pytest.raises(InvalidOperation) as caught:
        schema.parse(body, chat=chat)
    return openai_errors.param_name(caught.value.field)


# -- requests ------------------------------------------------------------------


def test_sampling_fields_reach_the_operation() -> None:
    op = _chat(
        presence_penalty=0.5,
        frequency_penalty=-1,
        repeat_penalty=1.3,
        min_p=0.1,
        seed=7,
        logit_bias={"12": -100, "3": 5.5},
        logprobs=True,
        top_logprobs=4,
    )
    assert (op.presence_penalty, op.frequency_penalty, op.repeat_penalty, op.min_p) == (0.5, -1.0, 1.3, 0.1)
    assert op.seed == 7
    assert op.logit_bias == {12: -100.0, 3: 5.5}
    assert op.logprobs == 4
    assert _chat(logprobs=True).logprobs == 0
    assert _chat(logprobs=False).logprobs is None
    assert _completion(logprobs=3).logprobs == 3
    assert _completion().logprobs is None
    # The operation survives the trip to the worker as JSON.
    again = parse_operation(op.model_dump_json())
    assert again == op


def test_response_formats_become_a_json_schema() -> None:
    assert _chat(response_format={"type": "text"}).json_schema is None
    assert _chat(response_format={"type": "json_object"}).json_schema == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    op = _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    assert op.json_schema == schema
    assert _completion(json_schema=schema).json_schema == schema
    assert _completion(grammar='root ::= "yes" | "no"').grammar == 'root ::= "yes" | "no"'


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": []}}}, "response_format"),
        ({"response_format": {"type": "json_object"}, "grammar": "root ::= x"}, "grammar"),
        ({"grammar": ""}, "grammar"),
        ({"json_schema": "object"}, "json_schema"),
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ],
)
def test_bad_chat_fields_name_the_param(fields: dict[str, Any], param: str) -> None:
    assert _refused(fields) == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"logprobs": 6}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"), ({"suffix": ["x"]}, "suffix")],
)
def test_bad_completion_fields_name_the_param(fields: dict[str, Any], param: str) -> None:
    assert _refused(fields, chat=False) == param


def test_a_huge_schema_is_refused() -> None:
    assert _refused({"json_schema": {"description": "x" * 70_000}}) == "json_schema"


# -- answers ---------------------------------------------------------------------

LP = [
    {
        "token": "Hel",
        "logprob": -0.25,
        "bytes": [72, 101, 108],
        "top_logprobs": [{"token": "Hel", "logprob": -0.25, "bytes": [72, 101, 108]}],
    },
    {"token": "lo", "logprob": -1.5, "bytes": [108, 111], "top_logprobs": []},
]


def _format(chat: bool, **fields: Any) -> openai_format.Format:
    op = _chat(**fields) if chat else _completion(**fields)
    call = schema.Call(op=op, chat=chat, model="m", stream=True, include_usage=False)
    return openai_format.Format(call, SimpleNamespace(id="job-abc-1", created_at=1.0))  # type: ignore[arg-type]


def _data(chunk: bytes) -> dict[str, Any]:
    text = chunk.decode()
    assert text.startswith("data: ") and text.endswith("\n\n")
    parsed: dict[str, Any] = json.loads(text[6:])
    return parsed


def test_chat_logprobs_shape() -> None:
    fmt = _format(True, logprobs=True, top_logprobs=1)
    choice = _data(fmt.token(("Hello", LP)))["choices"][0]
    assert choice["delta"] == {"content": "Hello"}
    assert choice["logprobs"] == {"content": LP, "refusal": None}
    plain = _data(fmt.token("x"))
    assert plain["choices"][0]["logprobs"] is None
    assert plain["system_fingerprint"] == "rbee-" + __version__ + "-m"
    whole = fmt.whole("Hello", {"tokens_in": 5, "tokens_out": 2, "tokens_reused": 3}, LP)
    assert whole["choices"][0]["logprobs"]["content"] == LP
    assert whole["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
    assert whole["system_fingerprint"].startswith("rbee-")


def test_completion_logprobs_shape_with_offsets_across_chunks() -> None:
    fmt = _format(False, logprobs=1)
    first = _data(fmt.token(("Hello", LP)))["choices"][0]["logprobs"]
    assert first == {
        "tokens": ["Hel", "lo"],
        "token_logprobs": [-0.25, -1.5],
        "top_logprobs": [{"Hel": -0.25}, {}],
        "text_offset": [0, 3],
    }
    second = _data(fmt.token(("Hello", LP[:1])))["choices"][0]["logprobs"]
    assert second["text_offset"] == [5]


def test_a_worker_refusal_names_the_field_the_client_sent() -> None:
    call = schema.parse({"model": "m", "messages": CHAT, "response_format": {"type": "json_object"}}, chat=True)
    end = {"status": "failed", "error": {"kind": "invalid_operation", "message": "json_schema: no way"}}
    body = json.loads(openai_errors.end_error_response(end, {}, call).body)
    assert body["error"]["param"] == "response_format"
    end["error"]["message"] = "logit_bias: 99 is not a token"
    assert json.loads(openai_errors.end_error_response(end, {}, call).body)["error"]["param"] == "logit_bias"


# -- the worker ----------------------------------------------------------------


@pytest.fixture
async def worker() -> AsyncIterator[tuple[httpx.AsyncClient, FakeEngine]]:
    engine = FakeEngine(tokens=6)
    app = create_worker_app(engine, WorkerSettings(worker_id="worker-test"))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://worker") as client,
    ):
        async with asyncio.timeout(10):
            while True:
                if (await client.get("/v1/ready")).json()["state"] == "idle":
                    break
                await asyncio.sleep(0.01)
        yield client, engine


async def _post(client: httpx.AsyncClient, **fields: Any) -> httpx.Response:
    op = {"operation": "infer", "model": "fake-model", "prompt": "hello", "max_tokens": 8, **fields}
    return await client.post("/v1/jobs", json=op)


async def _events(client: httpx.AsyncClient, job_id: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/stream") as source:
        async for sse in source.aiter_sse():
            out.append((sse.event, sse.data if sse.data == "[DONE]" else json.loads(sse.data)))
    return out


async def test_fields_reach_the_engine(worker: tuple[httpx.AsyncClient, FakeEngine]) -> None:
    client, engine = worker
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    r = await _post(
        client,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repeat_penalty=1.1,
        min_p=0.2,
        logit_bias={"2": -50},
        json_schema=schema,
        logprobs=2,
    )
    assert r.status_code == 201, r.text
    events = await _events(client, r.json()["job_id"])
    req = engine.last_request
    assert req is not None
    assert (req.presence_penalty, req.frequency_penalty, req.repeat_penalty, req.min_p) == (0.5, 0.25, 1.1, 0.2)
    assert req.logit_bias == {2: -50.0}
    assert req.grammar == schema_grammar(schema)
    assert req.logprobs == 2
    tokens = [data for kind, data in events if kind == "token"]
    assert tokens and all(len(t["lp"]) == len(t["ids"]) for t in tokens)
    assert [len(e["top_logprobs"]) for e in tokens[0]["lp"]] == [2]
    assert all(e["logprob"] <= 0 for t in tokens for e in t["lp"])


async def test_without_logprobs_token_events_have_none(worker: tuple[httpx.AsyncClient, FakeEngine]) -> None:
    client, _ = worker
    r = await _post(client)
    tokens = [data for kind, data in await _events(client, r.json()["job_id"]) if kind == "token"]
    assert tokens and all("lp" not in t for t in tokens)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"logit_bias": {"6": 1}}, "logit_bias"),  # the fake vocabulary is its 6 pieces
        ({"grammar": "start ::= [a-z]+"}, "grammar"),
        ({"json_schema": {"$ref": "#/nowhere"}}, "json_schema"),
    ],
)
async def test_worker_refuses_at_post_naming_the_field(
    worker: tuple[httpx.AsyncClient, FakeEngine], fields: dict[str, Any], field: str
) -> None:
    client, _ = worker
    r = await _post(client, **fields)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
    assert r.json()["error"]["message"].startswith(field + ":")

"""Ollama's API through a real queen (``--local-hive``) and the real model, with the official ``ollama`` client.

Tool calls are constrained by a grammar of the tools' schemas, so the arguments of every
call validate (``jsonschema_rs``, which schemathesis brings) against the schema the client
sent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema_rs
import ollama
import pytest

from cluster import Daemon, free_port, queen, wait_for
from modelserver import ModelServer, tiny_gguf
from rbee.contracts.operations import Infer

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

MODEL = "gemma3-270m"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]
GREEDY = {"temperature": 0, "num_predict": 16}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("ollama-e2e")
    q = queen(home / "queen", free_port(), "--local-hive").start()
    try:
        wait_for(lambda: httpx.get(q.url + "/api/tags").json()["models"], 60)
        yield q
    finally:
        q.stop()


@pytest.fixture(scope="module")
def client(cluster: Daemon) -> Iterator[ollama.Client]:
    with ollama.Client(host=cluster.url, timeout=240) as c:  # closed, so no socket is left for the GC
        yield c


def _job(cluster: Daemon, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = httpx.get(f"{cluster.url}/v1/jobs/{job_id}").json()
    return job


def test_generate_streamed_and_not_say_the_same(client: ollama.Client) -> None:
    whole = client.generate(model=MODEL, prompt="The sky is blue because", raw=True, options=GREEDY)
    assert whole.done and whole.done_reason == "length"
    assert whole.response
    assert whole.eval_count == 16 and (whole.prompt_eval_count or 0) > 0
    assert (whole.total_duration or 0) >= (whole.eval_duration or 0) > 0
    assert (whole.prompt_eval_duration or 0) > 0 and whole.load_duration is not None
    parts = list(client.generate(model=MODEL, prompt="The sky is blue because", raw=True, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.response or "" for p in parts) == whole.response
    assert parts[-1].eval_count == 16 and parts[-1].done_reason == "length"


def test_generate_with_the_template_and_a_system_prompt(client: ollama.Client) -> None:
    answer = client.generate(model=MODEL, system="You are terse.", prompt="Name three colors.", options=GREEDY)
    assert answer.done and (answer.response or "").strip()


def test_chat_streamed_and_not(client: ollama.Client, cluster: Daemon) -> None:
    whole = client.chat(model=MODEL, messages=CHAT, options=GREEDY)
    assert whole.message.role == "assistant"
    assert (whole.message.content or "").strip()
    assert whole.done and whole.done_reason in ("stop", "length")
    parts = list(client.chat(model=MODEL, messages=CHAT, options=GREEDY, stream=True))
    assert parts[-1].done and parts[-1].eval_count == whole.eval_count
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    # Every request is an ordinary job, in the history.
    r = httpx.post(
        cluster.url + "/api/chat", json={"model": MODEL, "messages": CHAT, "stream": False, "options": GREEDY}
    )
    job = _job(cluster, r.headers["x-rbee-job-id"])
    assert job["operation"] == "infer" and job["status"] == "completed"


def test_tags_show_version(client: ollama.Client) -> None:
    (model,) = [m for m in client.list().models if m.model == MODEL]
    assert (model.size or 0) > 0 and model.details is not None and model.details.format == "gguf"
    assert model.details.quantization_level
    shown = client.show(MODEL)
    assert shown.template  # the chat template rbee uses, by name
    assert shown.modelinfo is not None and any(k.endswith(".context_length") for k in shown.modelinfo)
    assert shown.details is not None and shown.details.family
    assert httpx.get(client._client.base_url.join("/api/version")).json()["version"]


def test_ps_then_keep_alive_0_unloads(client: ollama.Client) -> None:
    client.generate(model=MODEL, prompt="Hi", raw=True, options={"num_predict": 1})
    loaded = [m for m in client.ps().models if m.model == MODEL]
    assert loaded and loaded[0].expires_at is not None and (loaded[0].size or 0) > 0
    unloaded = client.generate(model=MODEL, keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload"
    wait_for(lambda: not [m for m in client.ps().models if m.model == MODEL], 30)
    # An empty prompt loads it again, for as long as keep_alive says.
    loaded_again = client.generate(model=MODEL, keep_alive="10m")
    assert loaded_again.done_reason == "load"
    assert [m for m in client.ps().models if m.model == MODEL]


def test_unknown_model_and_bad_options_raise_response_error(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as unknown:
        client.generate(model="no-such-model", prompt="hi")
    assert unknown.value.status_code == 404 and unknown.value.error == "model 'no-such-model' not found"
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.chat(model="no-such-model", messages=CHAT, stream=True))
    assert streamed.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as bad:
        client.generate(model=MODEL, prompt="hi", options={"temperature": 7})
    assert bad.value.status_code == 400 and "temperature" in bad.value.error
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("no-such-model")
    assert missing.value.status_code == 404


def test_a_job_cancelled_mid_stream_ends_with_an_error_line(client: ollama.Client, cluster: Daemon) -> None:
    body = {"model": MODEL, "prompt": "Count to one hundred:", "raw": True, "options": {"num_predict": 400}}
    with httpx.stream("POST", cluster.url + "/api/generate", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = r.iter_lines()
        assert '"done":false' in next(lines)
        httpx.delete(f"{cluster.url}/v1/jobs/{r.headers['x-rbee-job-id']}")
        rest = [line for line in lines if line]
    assert '"error"' in rest[-1] and '"done":true' not in rest[-1]
    # The official client raises it.
    options = {"num_predict": 400}
    stream = client.generate(model=MODEL, prompt="Count to one hundred:", raw=True, stream=True, options=options)
    first = next(iter(stream))
    assert not first.done
    jobs = httpx.get(cluster.url + "/v1/jobs").json()["jobs"]
    running = next(j for j in jobs if j["status"] in ("running", "queued"))
    httpx.delete(f"{cluster.url}/v1/jobs/{running['job_id']}")
    with pytest.raises(ollama.ResponseError):
        list(stream)


def test_a_client_that_leaves_cancels_its_job(cluster: Daemon) -> None:
    body = {"model": MODEL, "messages": CHAT, "options": {"num_predict": 400}}
    with httpx.stream("POST", cluster.url + "/api/chat", json=body, timeout=60) as r:
        job_id = r.headers["x-rbee-job-id"]
        next(r.iter_lines())
    job = wait_for(lambda: (j := _job(cluster, job_id))["status"] != "running" and j, 30)
    assert job["status"] == "cancelled", job


@pytest.mark.skipif("json_schema" not in Infer.model_fields, reason="the Infer operation has no json_schema")
def test_format_json_and_a_schema_constrain_the_answer(client: ollama.Client) -> None:
    answer = client.generate(model=MODEL, prompt="A JSON object about a cat:", format="json", options=GREEDY)
    assert answer.response and answer.response.lstrip().startswith("{")
    schema = {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
    }
    chat = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Pick a color."}],
        format=schema,
        options={"temperature": 0, "num_predict": 32},
    )
    assert json.loads(chat.message.content or "")["color"] in ("red", "green", "blue")


def test_embed_and_the_older_embeddings(client: ollama.Client) -> None:
    answer = client.embed(model=MODEL, input=["The sky is blue.", "Cats purr."])
    assert answer.model == MODEL and len(answer.embeddings) == 2
    for vector in answer.embeddings:
        assert len(vector) == 640
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-3)
    assert answer.embeddings[0] != answer.embeddings[1]
    assert (answer.prompt_eval_count or 0) > 0 and (answer.total_duration or 0) > 0
    one = client.embed(model=MODEL, input="Cats purr.")
    assert len(one.embeddings) == 1
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(one.embeddings[0], answer.embeddings[1], strict=True))
    old = client.embeddings(model=MODEL, prompt="Cats purr.")
    assert len(old.embedding) == 640
    with pytest.raises(ollama.ResponseError) as unknown:
        client.embed(model="no-such-model", input="x")
    assert unknown.value.status_code == 404


def get_weather(city: str, unit: str) -> str:
    """The current weather in a city.

    Args:
      city: The city's name
      unit: celsius or fahrenheit
    """
    return f"18 degrees {unit} and sunny in {city}"


#: What the client sends for ``get_weather`` (it keeps a schema's types, enums and required only).
WEATHER_SCHEMA = ollama._utils.convert_function_to_tool(get_weather).model_dump(exclude_none=True)["function"][
    "parameters"
]
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
TOOL_OPTIONS = {"temperature": 0, "num_predict": 120}


def test_chat_with_tools_is_a_call_whose_arguments_validate(client: ollama.Client, cluster: Daemon) -> None:
    answer = client.chat(model=MODEL, messages=ASK, tools=[get_weather], options=TOOL_OPTIONS)
    assert answer.done and answer.done_reason == "stop"
    assert answer.message.role == "assistant" and not answer.message.content
    (call,) = answer.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments, dict)
    jsonschema_rs.validate(WEATHER_SCHEMA, dict(call.function.arguments))
    # Sampled, each call still validates.
    for seed in range(5):
        options = {"temperature": 1.0, "seed": seed, "num_predict": 120}
        sampled = client.chat(model=MODEL, messages=ASK, tools=[get_weather], options=options)
        (call,) = sampled.message.tool_calls or []
        jsonschema_rs.validate(WEATHER_SCHEMA, dict(call.function.arguments))


def test_chat_with_tools_streamed_has_the_call_in_a_chunk(client: ollama.Client) -> None:
    parts = list(client.chat(model=MODEL, messages=ASK, tools=[get_weather], options=TOOL_OPTIONS, stream=True))
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema_rs.validate(WEATHER_SCHEMA, dict(calls[0].function.arguments))
    assert parts[-1].done and parts[-1].done_reason == "stop"
    assert all(not p.done for p in parts[:-1])
    # Greedy: the same call as not streaming.
    whole = client.chat(model=MODEL, messages=ASK, tools=[get_weather], options=TOOL_OPTIONS)
    assert whole.message.tool_calls is not None
    assert dict(whole.message.tool_calls[0].function.arguments) == dict(calls[0].function.arguments)


def test_the_tool_result_goes_back_and_the_answer_is_text(client: ollama.Client) -> None:
    first = client.chat(model=MODEL, messages=ASK, tools=[get_weather], options=TOOL_OPTIONS)
    (call,) = first.message.tool_calls or []
    result = get_weather(**call.function.arguments)
    messages: list[Any] = [*ASK, first.message, {"role": "tool", "content": result, "tool_name": "get_weather"}]
    answer = client.chat(model=MODEL, messages=messages, tools=[get_weather], options=GREEDY)
    assert (answer.message.content or "").strip() and not answer.message.tool_calls
    assert answer.done_reason in ("stop", "length")


def test_a_bad_tool_is_a_response_error_naming_it(client: ollama.Client) -> None:
    bad = {"type": "function", "function": {"name": "has space", "parameters": {"type": "object"}}}
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=MODEL, messages=ASK, tools=[bad])
    assert caught.value.status_code == 400 and "tools[0].function.name" in caught.value.error


@pytest.fixture(scope="module")
def model_server() -> Iterator[ModelServer]:
    with ModelServer() as server:
        server.add("/tiny-pulled.gguf", tiny_gguf(1024 * 1024))  # 4 MiB
        server.add("/slow-pulled.gguf", tiny_gguf(4 * 1024 * 1024), delay_s=0.2)
        yield server


def test_pull_with_progress_then_delete(client: ollama.Client, model_server: ModelServer) -> None:
    parts = list(client.pull(model_server.url("/tiny-pulled.gguf"), stream=True))
    statuses = [p.status for p in parts]
    assert statuses[0] == "pulling manifest" and statuses[-2:] == ["verifying sha256 digest", "success"]
    downloading = [p for p in parts if p.status == "downloading"]
    assert downloading
    assert downloading[-1].completed == downloading[-1].total and (downloading[-1].total or 0) > 4_000_000
    assert "tiny-pulled" in [m.model for m in client.list().models]
    assert client.delete("tiny-pulled").status == "success"
    assert "tiny-pulled" not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as gone:
        client.delete("tiny-pulled")
    assert gone.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as named:
        client.pull("llama3.2")
    assert named.value.status_code == 400 and "hf:" in named.value.error


def test_a_client_that_leaves_cancels_its_pull(cluster: Daemon, model_server: ModelServer) -> None:
    body = {"model": model_server.url("/slow-pulled.gguf")}
    with httpx.stream("POST", cluster.url + "/api/pull", json=body, timeout=60) as r:
        assert r.status_code == 200
        job_id = r.headers["x-rbee-job-id"]
        assert json.loads(next(r.iter_lines())) == {"status": "pulling manifest"}
    job = wait_for(lambda: (j := _job(cluster, job_id))["status"] != "running" and j, 30)
    assert job["status"] == "cancelled", job
    assert "slow-pulled" not in [m["name"] for m in httpx.get(cluster.url + "/api/tags").json()["models"]]

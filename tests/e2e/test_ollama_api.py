"""Ollama's API through a real queen (``--local-hive``) and the real model, with the official ``ollama`` client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import pytest

from cluster import Daemon, free_port, queen, wait_for
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
def client(cluster: Daemon) -> ollama.Client:
    return ollama.Client(host=cluster.url, timeout=240)


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

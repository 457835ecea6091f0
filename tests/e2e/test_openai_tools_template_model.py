"""``tool_choice: auto`` with a model whose own chat template renders tools, through real processes
and the official ``openai`` client.

The bundled model has no chat template, so this test gives a copy of it one: the GGUF's
header is rewritten with a Hermes-style ``tokenizer.chat_template`` that renders ``tools``
(the tensors are copied as they are). The hive's catalog reads that the template renders
tools, the queen sends them in the job, the worker's chat handler renders them (the prompt
grows), and the answer is parsed for the model's calls. A base model of 270M parameters
does not decide to call a tool, so a llama.cpp ``grammar`` makes it write a Hermes call;
what the test checks is everything around that choice.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cluster import Daemon, free_port, queen, wait_for
from rbee.hive.catalog import bundled_model_path

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

ALIAS = "gemma-tools"
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these tools:\n<tools>\n"
    "{%- for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    'Answer a call as <tool_call>{"name": ..., "arguments": {...}}</tool_call><|im_end|>\n{%- endif %}'
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endfor %}"
    "<|im_start|>assistant\n"
)
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
GRAMMAR = "root ::= " + json.dumps("Let me look. " + CALL)

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def with_template(source: Path, target: Path, template: str) -> Path:
    """A copy of a (little-endian, version 3) GGUF with ``tokenizer.chat_template`` set to ``template``."""
    with source.open("rb") as f:
        head = f.read(64 << 20)
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", head, 0)
        assert magic == b"GGUF" and version == 3
        at = 24

        def string(pos: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", head, pos)
            return head[pos + 8 : pos + 8 + n].decode(), pos + 8 + n

        def skip(kind: int, pos: int) -> int:
            if kind == 8:
                return string(pos)[1]
            if kind == 9:
                item, count = struct.unpack_from("<IQ", head, pos)
                pos += 12
                if item in _SIZES:
                    return pos + _SIZES[item] * count
                for _ in range(count):
                    pos = skip(item, pos)
                return pos
            return pos + _SIZES[kind]

        kvs: list[bytes] = []
        alignment = 32
        for _ in range(n_kv):
            start = at
            key, at = string(at)
            (kind,) = struct.unpack_from("<I", head, at)
            at = skip(kind, at + 4)
            if key == "general.alignment":
                (alignment,) = struct.unpack_from("<I", head, at - 4)
            if key != "tokenizer.chat_template":
                kvs.append(head[start:at])
        infos_start = at
        for _ in range(n_tensors):
            _, at = string(at)
            (dims,) = struct.unpack_from("<I", head, at)
            at += 4 + 8 * dims + 4 + 8
        infos = head[infos_start:at]
        data_start = -(-at // alignment) * alignment

        def s(text: str) -> bytes:
            raw = text.encode()
            return struct.pack("<Q", len(raw)) + raw

        kvs.append(s("tokenizer.chat_template") + struct.pack("<I", 8) + s(template))
        header = struct.pack("<4sIQQ", b"GGUF", 3, n_tensors, len(kvs)) + b"".join(kvs) + infos
        header += b"\0" * (-len(header) % alignment)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as out:
            out.write(header)
            f.seek(data_start)
            while chunk := f.read(16 << 20):
                out.write(chunk)
    return target


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("openai-tools-template") / "queen"
    model = with_template(bundled_model_path(), home / "models" / "gemma-tools-q4_k_m.gguf", TEMPLATE)
    q = queen(home, free_port(), "--local-hive", env={"RBEE_MODEL_DIRS": str(model.parent)}).start()
    try:
        wait_for(lambda: httpx.get(q.url + "/v1/models").json()["data"], 60)
        op = {"operation": "model_download", "hive_id": "localhost", "source": str(model), "alias": ALIAS}
        created = httpx.post(q.url + "/v1/jobs", json=op, timeout=30)
        assert created.status_code == 201, created.text
        job_id = created.json()["job_id"]
        wait_for(lambda: httpx.get(f"{q.url}/v1/jobs/{job_id}").json()["status"] == "completed", 120)
        wait_for(
            lambda: any(ALIAS in (m["id"], *m["aliases"]) for m in httpx.get(q.url + "/v1/models").json()["data"]), 30
        )
        yield q
    finally:
        q.stop()


@pytest.fixture(scope="module")
def client(cluster: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=240) as c:
        yield c


def test_auto_renders_the_tools_and_answers_the_models_call(client: openai.OpenAI, cluster: Daemon) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=ALIAS, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=120, extra_body={"grammar": GRAMMAR}
    )
    got = raw.parse()
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    job = httpx.get(f"{cluster.url}/v1/jobs/{raw.headers['x-rbee-job-id']}").json()
    assert job["payload"]["tools"][0]["function"]["name"] == "get_weather"
    # tool_choice none sends no tools: the template renders them only when given.
    plain = client.chat.completions.create(model=ALIAS, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=1)
    assert got.usage is not None and plain.usage is not None
    assert got.usage.prompt_tokens > plain.usage.prompt_tokens + 20


def test_auto_streams_the_text_then_the_call(client: openai.OpenAI) -> None:
    text = ""
    calls: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in client.chat.completions.create(
        model=ALIAS,
        messages=ASK,
        tools=[WEATHER],
        temperature=0,
        max_tokens=120,
        stream=True,
        extra_body={"grammar": GRAMMAR},
    ):
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"name": "", "arguments": ""})
            assert part.function is not None
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
        if chunk.choices[0].finish_reason:
            reasons.append(chunk.choices[0].finish_reason)
    assert text.strip() == "Let me look." and "<tool" not in text
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert reasons == ["tool_calls"]

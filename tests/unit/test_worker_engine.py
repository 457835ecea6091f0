"""Engines without a model: stop strings, the scripted engine and its slots, the repack choice.

The batching engine with the real model is in tests/e2e/test_batch_engine.py."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from rbee.worker.engine import (
    Finished,
    GenerationOutcome,
    GenerationRequest,
    LlamaEngine,
    StopScanner,
    generate,
    parse_device,
    repack_default,
)
from rbee.worker.fake import FakeEngine


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


def test_stop_scanner_says_which_stop_it_reached() -> None:
    scanner = StopScanner(["zz", "bb", "a"])
    assert scanner.matched is None
    assert scanner.feed("xxab") == ("xx", True)
    assert scanner.matched == "a"  # the earliest in the text, not the first given


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
    for piece in generate(engine, req, outcome, lambda: stop_after is not None and len(pieces) >= stop_after):
        pieces.append(piece)
    return pieces, outcome


def test_fake_engine_scripts_pieces_and_counts_them() -> None:
    engine = FakeEngine(tokens=4)
    pieces, outcome = _run(engine, GenerationRequest(prompt="a b c"))
    assert pieces == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]
    assert (outcome.tokens_in, outcome.tokens_out, outcome.stop_reason) == (3, 4, "eos")
    assert engine.generated == 4


def test_fake_engine_honours_max_tokens_stop_and_cancel() -> None:
    engine = FakeEngine(pieces=["a", "b", "c", "d"], delay_ms=20)
    assert _run(engine, GenerationRequest(prompt="p", max_tokens=2))[1].stop_reason == "max_tokens"
    pieces, outcome = _run(engine, GenerationRequest(prompt="p", stop=["c"]))
    assert (pieces, outcome.stop_reason) == (["a", "b"], "stop")
    pieces, outcome = _run(engine, GenerationRequest(prompt="p"), stop_after=1)
    assert pieces == ["a"] and outcome.tokens_out <= 2 and outcome.stop_reason == "cancelled"


def test_fake_engine_fails_after_k_tokens() -> None:
    engine = FakeEngine(tokens=10, fail_after=3)
    outcome = GenerationOutcome()
    seen = []
    with pytest.raises(RuntimeError, match="after 3"):
        for piece in generate(engine, GenerationRequest(prompt="p"), outcome):
            seen.append(piece)
    assert len(seen) == outcome.tokens_out == 3


def test_fake_engine_runs_its_slots_at_once_and_refuses_more() -> None:
    engine = FakeEngine(tokens=5, delay_ms=50, slots=2)
    outcomes = [GenerationOutcome() for _ in range(2)]
    sinks = [_Collect() for _ in range(2)]
    for outcome, sink in zip(outcomes, sinks, strict=True):
        engine.submit(GenerationRequest(prompt="p"), outcome, sink)
    with pytest.raises(RuntimeError, match="busy"):
        engine.submit(GenerationRequest(prompt="p"), GenerationOutcome(), _Collect())
    for sink in sinks:
        assert sink.done.wait(5)
    assert engine.peak == 2 and engine.running == 0
    assert [o.stop_reason for o in outcomes] == ["eos", "eos"]


class _Collect:
    def __init__(self) -> None:
        self.items: list[Any] = []
        self.done = threading.Event()

    def post(self, items: list[Any]) -> None:
        self.items += items
        if any(isinstance(i, Finished) for i in items):
            self.done.set()


def test_llama_engine_model_id_defaults_to_the_file_stem() -> None:
    assert LlamaEngine("/models/gemma-3-270m.gguf").model_id == "gemma-3-270m"
    assert LlamaEngine("/m/x.gguf", model_id="gemma3-270m").model_id == "gemma3-270m"


def test_repack_is_off_on_amx_cpus(tmp_path: Path) -> None:
    amx = tmp_path / "amx"
    amx.write_text("flags\t\t: fpu sse2 avx512f amx_bf16 amx_tile amx_int8\n")
    plain = tmp_path / "plain"
    plain.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert repack_default(amx) is False
    assert repack_default(plain) is True
    assert repack_default(tmp_path / "missing") is True

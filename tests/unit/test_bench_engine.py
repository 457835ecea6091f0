"""bench.engine's pure helpers: prompt rotation, round figures, llama-batched-bench's table."""

from __future__ import annotations

import argparse
import math

import pytest
from bench.engine import (
    PROMPTS,
    batched_bench_rows,
    level_figures,
    parse_batched_bench,
    parse_only,
    parse_streams,
    prompts_for,
    rotate,
    round_figures,
)

BATCHED_BENCH_OUTPUT = """\
main: n_kv_max = 8192, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, n_gpu_layers = -1

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    16 |     64 |    1 |     80 |    0.038 |   425.20 |    1.265 |    50.60 |    1.303 |    61.40 |
|    16 |     64 |    4 |    320 |    0.100 |   639.60 |    1.985 |   129.00 |    2.085 |   153.50 |

llama_perf_context_print:        load time =     123.45 ms
"""


def test_rotate_moves_the_first_items_to_the_end() -> None:
    assert rotate(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotate(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert rotate(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert rotate([], 3) == []


def test_prompts_differ_within_and_between_rounds() -> None:
    one = prompts_for(1, 8)
    assert len(set(one)) == 8
    assert {p.split(": ", 1)[1] for p in one} == set(PROMPTS)
    assert all(p.startswith("Story 1: ") for p in one)
    assert prompts_for(2, 1)[0] != prompts_for(1, 1)[0].replace("Story 1", "Story 2")  # rotated
    every = [p for r in range(1, 10) for p in prompts_for(r, 4)]
    assert len(set(every)) == len(every)
    assert len(set(prompts_for(3, 12))) == 12


def _stream(sent: float, first_ms: float, end: float, tokens: int, decode: float | None) -> dict[str, object]:
    return {"sent": sent, "end": end, "ttft_ms": first_ms, "tokens": tokens, "decode_tokens_per_s": decode}


def test_round_figures_use_the_wall_time_of_the_whole_round() -> None:
    streams = [_stream(10.0, 100.0, 11.0, 32, 40.0), _stream(10.5, 300.0, 12.0, 32, 50.0)]
    f = round_figures(streams)
    assert f["total_tokens_per_s"] == pytest.approx(64 / 2.0)
    assert f["ttft_ms"] == pytest.approx(200.0)
    assert f["decode_tokens_per_s"] == pytest.approx(45.0)
    assert f["tokens_per_stream"] == 32
    assert math.isnan(round_figures([_stream(0.0, 5.0, 1.0, 1, None)])["decode_tokens_per_s"])


def test_level_figures_are_medians_over_rounds() -> None:
    rounds = [
        {"total_tokens_per_s": v, "ttft_ms": v, "decode_tokens_per_s": v, "tokens_per_stream": 8, "wall_s": 1}
        for v in (3.0, 1.0, 2.0)
    ]
    f = level_figures(rounds)
    assert f["total_tokens_per_s"] == 2.0 and f["ttft_ms"] == 2.0 and f["tokens_per_stream"] == 8


def test_batched_bench_table_is_parsed() -> None:
    rows = parse_batched_bench(BATCHED_BENCH_OUTPUT)
    assert len(rows) == 2
    assert rows[1]["B"] == 4 and rows[1]["N_KV"] == 320 and rows[1]["S_PP t/s"] == pytest.approx(639.6)
    assert batched_bench_rows(rows) == {1: pytest.approx(50.6), 4: pytest.approx(129.0)}
    assert parse_batched_bench("no table here") == []


def test_flags_are_checked() -> None:
    assert parse_streams("1,4,8") == [1, 4, 8]
    assert parse_only("rbee,llama-server") == ["rbee", "llama-server"]
    for bad in ("", "0", "1,x"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            parse_streams(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_only("rbee,vllm")

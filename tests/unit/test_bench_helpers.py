"""The benchmark suite's pure helpers: statistics, stream parsing, the goal table, the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from bench._util import goal, holds_text, percentile
from bench.infer import Round, figures, pair_figures, token_stamps
from bench.jobs import stream_marks
from bench.summary import peer_goals, summarize


def test_percentile_is_linear_between_closest_ranks() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def test_goal_rows_say_whether_they_hold() -> None:
    row = goal("x", "< 1 ms", "0.5 ms", True, 0.5)
    assert row == {"goal": "x", "target": "< 1 ms", "measured": "0.5 ms", "holds": True, "value": 0.5}
    assert [holds_text(h) for h in (True, False, None)] == ["yes", "NO", "-"]


def frame(event_id: int, kind: str, data: Any) -> bytes:
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def test_token_stamps_count_every_token_frame_in_a_chunk() -> None:
    chunk = (
        frame(1, "narration", {"action": "x", "human": "event: token inside text"})
        + frame(2, "token", {"t": "Hel", "i": 0})
        + frame(3, "token", {"t": "lo", "i": 1})
    )
    stamps, texts = token_stamps(chunk, 7.5)
    assert stamps == [7.5, 7.5]
    assert texts == ["Hel", "lo"]
    assert token_stamps(frame(4, "end", {"status": "completed"}) + b"data: [DONE]\n\n", 8.0) == ([], [])


def test_figures_of_a_round() -> None:
    r = figures(10.0, [10.05, 10.15, 10.25], "abc")
    assert r.ttft_ms == pytest.approx(50.0)
    assert r.tokens_per_s == pytest.approx(10.0)
    assert r.tokens == 3 and r.text == "abc"
    with pytest.raises(RuntimeError):
        figures(0.0, [], "")


def test_pair_figures_are_medians_over_neighbouring_rounds() -> None:
    direct = [Round(40.0, 50.0, 64, "t"), Round(42.0, 40.0, 64, "t"), Round(41.0, 20.0, 64, "t")]
    rbee = [Round(43.0, 49.0, 64, "t"), Round(44.0, 41.0, 64, "t"), Round(80.0, 10.0, 64, "t")]
    pairs = pair_figures(direct, rbee)
    assert pairs["ratio"] == pytest.approx(0.98)  # 0.98, 1.025, 0.5: the loaded third pair does not decide
    assert pairs["ratio_min"] == pytest.approx(0.5) and pairs["ratio_max"] == pytest.approx(1.025)
    assert pairs["added_ttft_ms"] == pytest.approx(3.0)


def test_stream_marks_time_the_first_frame_the_end_and_done() -> None:
    marks: dict[str, float] = {}
    assert stream_marks(marks, frame(1, "narration", {"action": "job_start"}), 1.0) is None
    end = stream_marks(marks, frame(2, "end", {"status": "completed", "duration_ms": 0.5}) + b"data: [DONE]\n\n", 2.0)
    assert end is not None and json.loads(end)["duration_ms"] == 0.5
    assert marks == {"first": 1.0, "end": 2.0, "done": 2.0}


OPENAI: dict[str, Any] = {
    "settings": {"clients": 4},
    "single_stream": {
        "rbee": {"tokens_per_s": 40.0, "ttft_ms": 45.0},
        "peer": {"tokens_per_s": 39.0, "ttft_ms": 40.0},
        "ratio": {"tokens_per_s": 40.0 / 39.0, "ttft_ms": 45.0 / 40.0},
    },
    "concurrent": {
        "rbee_2_workers": {"total_tokens_per_s": 60.0},
        "peer": {"total_tokens_per_s": 30.0},
        "ratio": {"rbee_2_workers": 2.0},
    },
}


def test_peer_goals_are_read_from_the_peer_benchmark() -> None:
    rows = {r["goal"]: r for r in peer_goals(OPENAI)}
    single = rows["peer: tokens/s at 1 client, rbee / llama_cpp.server"]
    assert single["holds"] is True and single["measured"].startswith("1.026")
    both = rows["peer: total tokens/s, 4 clients, rbee on 2 workers / llama_cpp.server"]
    assert both["holds"] is True and "60.0 vs 30.0" in both["measured"]
    assert rows["peer: time to first token at 1 client, rbee / llama_cpp.server"]["holds"] is None
    assert peer_goals({}) == []


def test_summary_keeps_goals_in_suite_order_and_says_what_did_not_run() -> None:
    jobs = {"goals": [goal("control: a", "< 1", "0.5", True), goal("control: figure", "-", "3", None)]}
    infer = {"goals": [goal("relay: b", ">= 0.98", "0.9", False)]}
    rows = summarize({"infer": infer, "jobs": jobs, "openai": None}, {"openai": "stopped after 300 s"})
    assert [r["goal"] for r in rows] == ["control: a", "relay: b", "openai: did not complete"]
    assert rows[-1]["holds"] is False and rows[-1]["measured"] == "stopped after 300 s"


def test_plots_are_drawn_from_the_results(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.plot import plot_all

    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    rounds = [{"tokens_per_s": 40.0 + i, "ttft_ms": 45.0 + i} for i in range(3)]
    infer = {"rbee": {"tokens_per_s": 41.0, "ttft_ms": 46.0}, "direct": {"tokens_per_s": 42.0, "ttft_ms": 44.0}}
    (results / "infer.json").write_text(json.dumps({**infer, "raw": {"rbee": rounds, "direct": rounds}}))
    (results / "openai.json").write_text(json.dumps({**OPENAI, "raw": {"rbee": rounds, "peer": rounds}}))
    written = plot_all(results, docs)
    assert sorted(p.name for p in written) == ["bench-peer.png", "bench-relay.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)

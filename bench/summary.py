"""The suite's final table: every goal, the figure measured for it, and whether it holds.

Each benchmark writes ``bench/results/<name>.json``; ``jobs`` and ``infer``
list their goals there (``goals``: rows of :func:`bench._util.goal`). The
peer benchmark's goals are read from its figures here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench._util import goal

__all__ = ["BENCHMARKS", "peer_goals", "summarize"]

#: The suite, in the order it runs (cheapest first, so a failure shows early).
BENCHMARKS = ("jobs", "infer", "openai")
#: The peer goals: rbee at least as fast at one client; more in all than the peer at four clients on two workers.
GOAL_PEER_RATIO = 1.0


def _number(data: Any, *path: str) -> float | None:
    for key in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return float(data) if isinstance(data, int | float) and not isinstance(data, bool) else None


def peer_goals(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The goals of ``bench.openai_api`` (rbee's OpenAI endpoint against ``llama_cpp.server``)."""
    rows = []
    ratio = _number(result, "single_stream", "ratio", "tokens_per_s")
    rbee, peer = (
        _number(result, "single_stream", "rbee", "tokens_per_s"),
        _number(result, "single_stream", "peer", "tokens_per_s"),
    )
    if ratio is not None:
        detail = f" ({rbee:.1f} vs {peer:.1f})" if rbee is not None and peer is not None else ""
        rows.append(
            goal(
                "peer: tokens/s at 1 client, rbee / llama_cpp.server",
                f">= {GOAL_PEER_RATIO:g}",
                f"{ratio:.3f}{detail}",
                ratio >= GOAL_PEER_RATIO,
                ratio,
            )
        )
    ttft = _number(result, "single_stream", "ratio", "ttft_ms")
    if ttft is not None:
        rows.append(
            goal("peer: time to first token at 1 client, rbee / llama_cpp.server", "-", f"{ttft:.3f}", None, ttft)
        )
    concurrent = result.get("concurrent") if isinstance(result.get("concurrent"), Mapping) else {}
    both = _number(concurrent, "ratio", "rbee_2_workers")
    if both is None:
        both = _number(concurrent, "ratio", "total_tokens_per_s")
    if both is not None:
        clients = _number(result, "settings", "clients")
        who = f"{clients:.0f} clients" if clients else "concurrent clients"
        rbee_tps = _number(concurrent, "rbee_2_workers", "total_tokens_per_s") or _number(
            concurrent, "rbee", "total_tokens_per_s"
        )
        peer_tps = _number(concurrent, "peer", "total_tokens_per_s")
        detail = (
            f" ({rbee_tps:.1f} vs {peer_tps:.1f} tokens/s)" if rbee_tps is not None and peer_tps is not None else ""
        )
        rows.append(
            goal(
                f"peer: total tokens/s, {who}, rbee on 2 workers / llama_cpp.server",
                f"> {GOAL_PEER_RATIO:g}",
                f"{both:.3f}{detail}",
                both > GOAL_PEER_RATIO,
                both,
            )
        )
    return rows


def summarize(
    results: Mapping[str, Mapping[str, Any] | None], errors: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Goal rows of every benchmark, in suite order; a benchmark without results gives one row that says why."""
    errors = errors or {}
    rows: list[dict[str, Any]] = []
    for name in BENCHMARKS:
        result = results.get(name)
        if result is None:
            if name in errors:
                rows.append(goal(f"{name}: did not complete", "-", errors[name], False))
            continue
        found = peer_goals(result) if name == "openai" and "goals" not in result else list(result.get("goals", []))
        rows.extend(r for r in found if r.get("holds") is not None)
    return rows

"""Plots of the benchmark results for ``docs/benchmarks.md`` (matplotlib, the ``bench`` extra).

    .venv/bin/python -m bench.plot

* ``docs/bench-peer.png``: tokens/s and time to first token, rbee's OpenAI
  endpoint against ``llama_cpp.server`` (from ``openai.json``), and total
  tokens/s with four clients;
* ``docs/bench-relay.png``: the same two figures, rbee against
  llama-cpp-python called in-process (from ``infer.json``).

Bars are medians; the dots are the single rounds, so the spread (the machine
is shared) is in the picture too (triangles: rounds off the top of the axis).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._util import RESULTS_DIR

__all__ = ["DOCS_DIR", "main", "plot_all"]

DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"
_COLOURS = ("#d9a400", "#5b6f8c")  # rbee, the other side


def _load(name: str, results: Path) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def _pair(
    ax: Any,
    title: str,
    unit: str,
    labels: Sequence[str],
    medians: Sequence[float],
    rounds: Sequence[Sequence[float]],
) -> None:
    xs = range(len(labels))
    ax.bar(xs, medians, color=_COLOURS[: len(labels)], width=0.6)
    # Rounds far above the medians (a burst of load on the shared machine)
    # would flatten the bars: they are drawn at the top edge, as triangles.
    top = max(medians) * 2.2 if max(medians) > 0 else 1.0
    for x, values in zip(xs, rounds, strict=True):
        inside = [v for v in values if v <= top]
        above = [v for v in values if v > top]
        if inside:
            ax.scatter([x] * len(inside), inside, s=10, color="black", alpha=0.45, zorder=3)
        if above:
            ax.scatter([x] * len(above), [top * 0.98] * len(above), s=18, marker="^", color="black", alpha=0.6)
    for x, value in zip(xs, medians, strict=True):
        ax.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom", xytext=(8, 3), textcoords="offset points")
    ax.set_ylim(0, top)
    ax.set_xticks(list(xs), labels)
    ax.set_title(title)
    ax.set_ylabel(unit)
    ax.spines[["top", "right"]].set_visible(False)


def plot_peer(data: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    single = data["single_stream"]
    raw = data.get("raw", {})
    labels = ("rbee", "llama_cpp.server")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    _pair(
        axes[0],
        "decode rate, 1 client",
        "tokens/s",
        labels,
        [single["rbee"]["tokens_per_s"], single["peer"]["tokens_per_s"]],
        [[r["tokens_per_s"] for r in raw.get("rbee", [])], [r["tokens_per_s"] for r in raw.get("peer", [])]],
    )
    _pair(
        axes[1],
        "time to first token, 1 client",
        "ms",
        labels,
        [single["rbee"]["ttft_ms"], single["peer"]["ttft_ms"]],
        [[r["ttft_ms"] for r in raw.get("rbee", [])], [r["ttft_ms"] for r in raw.get("peer", [])]],
    )
    concurrent = data.get("concurrent", {})
    rbee2 = concurrent.get("rbee_2_workers") or concurrent.get("rbee") or {}
    clients = data.get("settings", {}).get("clients", 4)
    _pair(
        axes[2],
        f"total, {clients} clients",
        "tokens/s",
        ("rbee, 2 workers", "llama_cpp.server"),
        [rbee2.get("total_tokens_per_s", 0.0), concurrent.get("peer", {}).get("total_tokens_per_s", 0.0)],
        [[], []],
    )
    fig.suptitle("rbee's OpenAI endpoint against llama-cpp-python's server (same GGUF, greedy, one run)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_relay(data: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    raw = data.get("raw", {})
    labels = ("rbee", "in-process")
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.8))
    _pair(
        axes[0],
        "decode rate",
        "tokens/s",
        labels,
        [data["rbee"]["tokens_per_s"], data["direct"]["tokens_per_s"]],
        [[r["tokens_per_s"] for r in raw.get("rbee", [])], [r["tokens_per_s"] for r in raw.get("direct", [])]],
    )
    _pair(
        axes[1],
        "time to first token",
        "ms",
        labels,
        [data["rbee"]["ttft_ms"], data["direct"]["ttft_ms"]],
        [[r["ttft_ms"] for r in raw.get("rbee", [])], [r["ttft_ms"] for r in raw.get("direct", [])]],
    )
    fig.suptitle("rbee (queen, hive, worker) against llama-cpp-python in-process")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_all(results: Path = RESULTS_DIR, docs: Path = DOCS_DIR) -> list[Path]:
    """Every plot whose results exist; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    docs.mkdir(parents=True, exist_ok=True)
    written = []
    peer = _load("openai", results)
    if peer is not None and "single_stream" in peer:
        written.append(plot_peer(peer, docs / "bench-peer.png"))
    relay = _load("infer", results)
    if relay is not None and "rbee" in relay and "direct" in relay:
        written.append(plot_relay(relay, docs / "bench-relay.png"))
    return written


def main() -> None:
    for path in plot_all():
        print(f"written: {path}")


if __name__ == "__main__":
    main()

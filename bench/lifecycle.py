"""Keep-alive with the bundled model: how soon an idle worker goes, and what the next request pays.

    .venv/bin/python -m bench.lifecycle [--keep-alive 2] [--rounds 3]

A queen with its local hive (the real model). Each round: a warm greedy
request with ``keep_alive`` seconds (the worker is loaded already), the time
from its end until the worker has left the queen's status (the hive stops it
once it has been idle that long; goal: within one heartbeat interval, 2 s,
after the keep-alive), then a request that finds no worker, whose time to
first token includes starting a worker and loading the model (the
``infer_spawned`` narration says how long loading took). Medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from bench._util import command_line, free_port, print_table, start_server, venv_bin, write_results
from rbee.jobs.client import JobClient

__all__ = ["main"]

MODEL = "gemma3-270m"
PROMPT = "The sky is blue because"


async def _timed(client: JobClient, op: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    job_id = await client.submit(op)
    first: float | None = None
    load_ms: float | None = None
    end: dict[str, Any] = {}
    async for event in client.events(job_id):
        if event.kind == "token" and first is None:
            first = time.perf_counter()
        elif event.kind == "narration" and event.data.get("action") == "infer_spawned":
            load_ms = event.data.get("load_ms")
        elif event.kind == "end":
            end = event.data
    done = time.perf_counter()
    return {
        "ttft_ms": None if first is None else (first - started) * 1000,
        "load_ms": load_ms,
        "ended": done,
        "status": end.get("status"),
    }


async def _workers(client: JobClient) -> list[dict[str, Any]]:
    job_id = await client.submit({"operation": "status"})
    result = [e.data async for e in client.events(job_id) if e.kind == "result"]
    return list(result[0]["workers"]) if result else []


async def _bench(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    op = {"operation": "infer", "model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    rows = []
    async with JobClient(url) as client:
        await _timed(client, {**op, "keep_alive": -1})  # a worker, loaded
        for n in range(args.rounds):
            warm = await _timed(client, {**op, "keep_alive": args.keep_alive})
            gone = False
            while not gone:  # polled: the worker's leaving is seen in the queen's status
                gone = not await _workers(client)
                if not gone:
                    await asyncio.sleep(0.05)
            gone_s = time.perf_counter() - warm["ended"]
            cold = await _timed(client, {**op, "keep_alive": -1 if n < args.rounds - 1 else 0})
            rows.append(
                {
                    "round": n + 1,
                    "warm_ttft_ms": round(warm["ttft_ms"] or 0, 1),
                    "gone_after_s": round(gone_s, 2),
                    "cold_ttft_ms": round(cold["ttft_ms"] or 0, 1),
                    "load_ms": cold["load_ms"],
                    "status": cold["status"],
                }
            )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.lifecycle", description=__doc__.split("\n")[0])
    parser.add_argument("--keep-alive", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    port = free_port()
    queen = start_server(
        [venv_bin("queen-rbee"), "--host", "127.0.0.1", "--port", str(port), "--local-hive"], port=port, timeout_s=60
    )
    try:
        rows = asyncio.run(_bench(queen.url, args))
    finally:
        queen.stop()
    print_table([[r[k] for k in rows[0]] for r in rows], list(rows[0]))
    summary = {
        "keep_alive_s": args.keep_alive,
        "median_gone_after_s": statistics.median(r["gone_after_s"] for r in rows),
        "median_warm_ttft_ms": statistics.median(r["warm_ttft_ms"] for r in rows),
        "median_cold_ttft_ms": statistics.median(r["cold_ttft_ms"] for r in rows),
    }
    print(
        f"\nkeep_alive {args.keep_alive:g} s: the idle worker left after {summary['median_gone_after_s']} s (median);"
        f" first token {summary['median_warm_ttft_ms']} ms warm, {summary['median_cold_ttft_ms']} ms when the"
        " worker had to be started and the model loaded again"
    )
    print(f"command: {command_line()}")
    out = {"command": command_line(), "args": vars(args), "rounds": rows, "summary": summary}
    write_results("lifecycle", out)
    return out


if __name__ == "__main__":
    main()

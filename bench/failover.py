"""A greedy job whose worker is killed mid-answer, carried over to another worker.

    .venv/bin/python -m bench.failover [--trials 10] [--max-tokens 200] [--kill-after 50]

A real queen with its local hive and two workers of the bundled model. First
an undisturbed greedy run of the prompt; then, ``--trials`` times, the same
job, whose worker gets ``kill -9`` once the client has ``--kill-after``
tokens. The queen carries the job over to the other worker (``resume_tokens``:
the token ids already sent), and a new second worker is started for the next
trial. Reported per trial: whether the stream's indices are contiguous,
whether the whole text equals the undisturbed run's (the new worker evaluates
the tokens already generated as one batch, where the first worker decoded them
one step at a time, and llama.cpp's numerics may differ between the two), the
first differing token, and the gap the client saw (last token before the kill
to the first one after).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time
from typing import Any

from bench._util import command_line, free_port, print_table, start_server, venv_bin, write_results
from rbee.jobs.client import JobClient

__all__ = ["main"]

PROMPT = "The sky is blue because"
MODEL = "gemma3-270m"


async def _run(client: JobClient, op: dict[str, Any]) -> list[Any]:
    job_id = await client.submit(op)
    return [e async for e in client.events(job_id)]


async def _workers(client: JobClient) -> list[dict[str, Any]]:
    events = await _run(client, {"operation": "status"})
    result = next(e.data for e in events if e.kind == "result")
    return [w for w in result["workers"] if w["state"] in ("ready", "busy")]


async def _ensure_workers(client: JobClient, n: int) -> None:
    while len(await _workers(client)) < n:
        events = await _run(client, {"operation": "worker_spawn", "hive_id": "localhost", "model": MODEL})
        end = events[-1].data
        if end.get("status") != "completed":
            raise RuntimeError(f"worker_spawn ended {end}")
        await asyncio.sleep(0.5)  # its first heartbeat


def _tokens(events: list[Any]) -> list[dict[str, Any]]:
    return [e.data for e in events if e.kind == "token"]


async def _trial(client: JobClient, op: dict[str, Any], kill_after: int) -> dict[str, Any]:
    job_id = await client.submit(op)
    events: list[Any] = []
    stamps: list[float] = []
    worker_id = ""
    killed_at_token = -1
    async for event in client.events(job_id):
        events.append(event)
        if event.kind == "narration" and event.data.get("action") == "infer_worker" and not worker_id:
            worker_id = event.data["worker_id"]
        if event.kind == "token":
            stamps.append(time.perf_counter())
            if len(stamps) == kill_after:
                worker = next(w for w in await _workers(client) if w["worker_id"] == worker_id)
                os.kill(worker["pid"], signal.SIGKILL)
                killed_at_token = len(stamps)
    end = events[-1].data
    gap_ms = (stamps[killed_at_token] - stamps[killed_at_token - 1]) * 1000 if len(stamps) > killed_at_token else None
    return {"end": end, "tokens": _tokens(events), "gap_ms": gap_ms}


async def _bench(url: str, args: argparse.Namespace) -> dict[str, Any]:
    op = {"operation": "infer", "model": MODEL, "prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0}
    async with JobClient(url) as client:
        await _ensure_workers(client, 2)
        reference = _tokens(await _run(client, op))
        ref_text = "".join(t["t"] for t in reference)
        ref_ids = [i for t in reference for i in t.get("ids", ())]
        rows = []
        for n in range(args.trials):
            await _ensure_workers(client, 2)
            got = await _trial(client, op, args.kill_after)
            end, tokens = got["end"], got["tokens"]
            ids = [i for t in tokens for i in t.get("ids", ())]
            first_diff = next((k for k, (a, b) in enumerate(zip(ids, ref_ids, strict=False)) if a != b), None)
            if first_diff is None and len(ids) != len(ref_ids):
                first_diff = min(len(ids), len(ref_ids))
            rows.append(
                {
                    "trial": n + 1,
                    "status": end.get("status"),
                    "failovers": len(end.get("failovers") or ()),
                    "contiguous": [t["i"] for t in tokens] == list(range(len(tokens))),
                    "first_kept": tokens[: args.kill_after] == reference[: args.kill_after],
                    "tokens_out": end.get("tokens_out"),
                    "identical": "".join(t["t"] for t in tokens) == ref_text,
                    "first_diff_token": first_diff,
                    "gap_ms": None if got["gap_ms"] is None else round(got["gap_ms"], 1),
                }
            )
            await asyncio.sleep(1.0)  # the hive notices the dead worker
    return {"reference_tokens_out": len(ref_ids), "trials": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--kill-after", type=int, default=50)
    args = parser.parse_args(argv)
    port = free_port()
    queen = start_server(
        [venv_bin("queen-rbee"), "--host", "127.0.0.1", "--port", str(port), "--local-hive"],
        port=port,
        timeout_s=60,
    )
    try:
        data = asyncio.run(_bench(queen.url, args))
    finally:
        queen.stop()
    rows = data["trials"]
    print_table(
        [[r[k] for k in rows[0]] for r in rows],
        list(rows[0]),
    )
    identical = sum(r["identical"] for r in rows)
    gaps = [r["gap_ms"] for r in rows if r["gap_ms"] is not None]
    summary = {
        "trials": len(rows),
        "completed": sum(r["status"] == "completed" for r in rows),
        "contiguous": sum(r["contiguous"] and r["first_kept"] for r in rows),
        "identical_to_undisturbed": identical,
        "median_gap_ms": round(statistics.median(gaps), 1) if gaps else None,
    }
    print(
        f"\n{summary['completed']}/{len(rows)} completed, {summary['contiguous']}/{len(rows)} contiguous with the"
        f" first {args.kill_after} tokens kept, {identical}/{len(rows)} texts identical to the undisturbed run;"
        f" median gap at the failover {summary['median_gap_ms']} ms"
    )
    print(f"command: {command_line()}")
    out = {"command": command_line(), "args": vars(args), **data, "summary": summary}
    write_results("failover", out)
    return out


if __name__ == "__main__":
    main()

"""Load: 500 concurrent ``infer`` jobs against a queen with two workers.

For each engine (the scripted fake, then the real model), a queen and a hive
are started as subprocesses on loopback, two workers are spawned, and the
jobs are sent all at once, twice:

* ``burst``: one attempt each. Past the queue bound the queen answers ``429``
  with ``Retry-After``; every accepted job must end with exactly one ``end``.
* ``retry``: a refused job waits its ``Retry-After`` and tries again (bounded
  attempts), so every job is eventually served.

Nothing may hang: every job has a deadline, and a job whose stream closes
without an ``end`` or that passes the deadline is counted, never waited for.
The request count is bounded and the run stops by itself.

    .venv/bin/python -m bench.load                  # both engines
    .venv/bin/python -m bench.load --engine fake    # the scripted engine only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench._util import Server, command_line, free_port, percentile, print_table, start_server, venv_bin, write_results

PROMPT = "The sky is blue because"
FAKE_ENV = {"RBEE_FAKE_TOKENS": "16", "RBEE_FAKE_DELAY_MS": "5"}


@dataclass
class Outcome:
    post_status: int = 0
    attempts: int = 0
    retry_after_ok: bool = True  # every 429 carried a numeric Retry-After
    ends: int = 0
    status: str | None = None
    error_kind: str | None = None
    tokens: int = 0
    latency_s: float | None = None  # first POST to the end event
    hung: bool = False
    broken: str | None = None


async def one_job(
    client: httpx.AsyncClient, url: str, op: dict[str, Any], *, retry: bool, max_attempts: int, deadline_s: float
) -> Outcome:
    out = Outcome()
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(deadline_s):
            while True:
                out.attempts += 1
                response = await client.post(url + "/v1/jobs", json=op)
                out.post_status = response.status_code
                if response.status_code == 429:
                    after = response.headers.get("retry-after", "")
                    out.retry_after_ok = out.retry_after_ok and after.isdigit()
                    if retry and out.attempts < max_attempts:
                        await asyncio.sleep(float(after) if after.isdigit() else 1.0)
                        continue
                    return out
                if response.status_code != 201:
                    return out
                job_id = response.json()["job_id"]
                break
            kind = ""
            async with client.stream("GET", f"{url}/v1/jobs/{job_id}/stream") as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                        if kind == "token":
                            out.tokens += 1
                        elif kind == "end":
                            out.ends += 1
                    elif line.startswith("data: ") and kind == "end":
                        end = json.loads(line[6:])
                        out.status = end["status"]
                        out.error_kind = (end.get("error") or {}).get("kind")
                        kind = ""
                    elif line == "data: [DONE]":
                        break
            out.latency_s = time.perf_counter() - t0
            if out.ends == 0:
                out.broken = "the stream closed without an end"
    except TimeoutError:
        out.hung = True
    except httpx.HTTPError as exc:
        out.broken = f"{type(exc).__name__}: {exc}"
    return out


async def run_phase(url: str, jobs: int, op: dict[str, Any], *, retry: bool, deadline_s: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=jobs * 2, max_keepalive_connections=jobs)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=deadline_s), limits=limits) as client:
        t0 = time.perf_counter()
        outcomes = await asyncio.gather(
            *(one_job(client, url, op, retry=retry, max_attempts=200, deadline_s=deadline_s) for _ in range(jobs))
        )
        wall_s = time.perf_counter() - t0
    accepted = [o for o in outcomes if o.post_status == 201]
    latencies = [o.latency_s for o in accepted if o.latency_s is not None]
    return {
        "jobs": jobs,
        "wall_s": round(wall_s, 3),
        "accepted": len(accepted),
        "refused_429": sum(1 for o in outcomes if o.post_status == 429),
        "other_post_status": dict(Counter(o.post_status for o in outcomes if o.post_status not in (201, 429))),
        "every_429_has_retry_after": all(o.retry_after_ok for o in outcomes),
        "attempts": sum(o.attempts for o in outcomes),
        "exactly_one_end": sum(1 for o in accepted if o.ends == 1),
        "no_end": sum(1 for o in accepted if o.ends == 0),
        "more_than_one_end": sum(1 for o in accepted if o.ends > 1),
        "hung": sum(1 for o in outcomes if o.hung),
        "broken": [o.broken for o in outcomes if o.broken][:5],
        "end_status": dict(Counter(f"{o.status}/{o.error_kind}" if o.error_kind else str(o.status) for o in accepted)),
        "tokens": sum(o.tokens for o in accepted),
        "jobs_per_s": round(len(latencies) / wall_s, 2) if wall_s else None,
        "latency_s": {
            "p50": round(percentile(latencies, 50), 3),
            "p95": round(percentile(latencies, 95), 3),
            "max": round(max(latencies), 3) if latencies else None,
        },
        "outcomes_sample": [asdict(o) for o in outcomes[:3]],
    }


def _run_op(url: str, op: dict[str, Any], timeout_s: float = 300.0) -> dict[str, Any]:
    """Run one operation on the queen; return its end event (and the last result)."""
    with httpx.Client(timeout=httpx.Timeout(10.0, read=timeout_s)) as client:
        job_id = client.post(url + "/v1/jobs", json=op).json()["job_id"]
        end: dict[str, Any] = {}
        result: Any = None
        kind = ""
        with client.stream("GET", f"{url}/v1/jobs/{job_id}/stream") as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: {"):
                    if kind == "end":
                        end = json.loads(line[6:])
                    elif kind == "result":
                        result = json.loads(line[6:])
                elif line == "data: [DONE]":
                    break
    return {**end, "result": result}


def start_cluster(engine: str, workers: int, queue_size: int, root: Path) -> tuple[Server, Server]:
    queen_port, hive_port = free_port(), free_port()
    (root / "queen").mkdir(parents=True)
    (root / "hive").mkdir(parents=True)
    queen = start_server(
        [venv_bin("queen-rbee"), "--port", str(queen_port), "--queue-size", str(queue_size)],
        port=queen_port,
        home=root / "queen",
    )
    hive_args = [venv_bin("rbee-hive"), "--port", str(hive_port), "--queen-url", queen.url, "--hive-id", "load"]
    hive_args += ["--worker-engine", engine]
    if engine == "llama":
        # Two workers share two cores: one thread each.
        hive_args += ["--worker-arg=--threads=1"]
    hive = start_server(hive_args, port=hive_port, home=root / "hive", env=FAKE_ENV if engine == "fake" else None)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        hives = _run_op(queen.url, {"operation": "hive_list"})["result"]["hives"]
        if any(h["state"] == "online" for h in hives):
            break
        time.sleep(0.2)
    for _ in range(workers):
        end = _run_op(queen.url, {"operation": "worker_spawn", "hive_id": "load"})
        if end.get("status") != "completed":
            raise RuntimeError(f"worker_spawn failed: {end}")
    return queen, hive


def run_engine(engine: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    queen, hive = start_cluster(engine, args.workers, args.queue_size, root / engine)
    try:
        op = {"operation": "infer", "prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0}
        # One job first, so the worker is warm and the queue has a typical duration.
        warm = _run_op(queen.url, op)
        assert warm.get("status") == "completed", warm
        proc = psutil.Process(queen.pid)
        rss_before = proc.memory_info().rss
        phases: dict[str, Any] = {}
        for name, retry in (("burst", False), ("retry", True)):
            print(f"[{engine}] {name}: {args.jobs} concurrent jobs ...", flush=True)
            phases[name] = asyncio.run(run_phase(queen.url, args.jobs, op, retry=retry, deadline_s=args.deadline))
        status = _run_op(queen.url, {"operation": "status"})["result"]
        info = httpx.get(queen.url + "/v1/info", timeout=5).json()
        return {
            "engine": engine,
            "workers": args.workers,
            "queue_size": args.queue_size,
            "max_tokens": args.max_tokens,
            "phases": phases,
            "queen_rss_mib": {
                "before": round(rss_before / 2**20, 1),
                "after": round(proc.memory_info().rss / 2**20, 1),
            },
            "after": {"queues": status["queues"], "jobs_live": info["jobs_live"], "tasks": info["tasks"]},
        }
    finally:
        hive.stop()
        queen.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["fake", "llama", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=600.0, help="Seconds any one job may take, retries included.")
    args = parser.parse_args(argv)
    engines = ["fake", "llama"] if args.engine == "both" else [args.engine]

    import tempfile

    runs = []
    with tempfile.TemporaryDirectory(prefix="rbee-load-") as tmp:
        for engine in engines:
            runs.append(run_engine(engine, args, Path(tmp)))

    rows = []
    for run in runs:
        for name, p in run["phases"].items():
            rows.append(
                [
                    run["engine"],
                    name,
                    p["jobs"],
                    p["accepted"],
                    p["refused_429"],
                    f"{p['exactly_one_end']}/{p['accepted']}",
                    p["no_end"] + p["more_than_one_end"],
                    p["hung"],
                    ", ".join(f"{k}: {v}" for k, v in sorted(p["end_status"].items())),
                    p["wall_s"],
                    p["jobs_per_s"],
                    p["latency_s"]["p50"],
                    p["latency_s"]["p95"],
                ]
            )
    print()
    print_table(
        rows,
        [
            "engine",
            "phase",
            "jobs",
            "accepted",
            "429",
            "one end",
            "bad ends",
            "hung",
            "end status",
            "wall s",
            "jobs/s",
            "p50 s",
            "p95 s",
        ],
    )
    for run in runs:
        print(
            f"{run['engine']}: queen RSS {run['queen_rss_mib']['before']} -> {run['queen_rss_mib']['after']} MiB;"
            f" after: queues {run['after']['queues'] or 'empty'}, live jobs {run['after']['jobs_live']}"
        )
    path = write_results("load", {"runs": runs})
    print(f"\n{command_line()}\nwrote {path}")
    bad = [
        (r["engine"], n)
        for r in runs
        for n, p in r["phases"].items()
        if p["hung"] or p["no_end"] or p["more_than_one_end"] or not p["every_429_has_retry_after"]
    ]
    if bad:
        raise SystemExit(f"load test failed in {bad}")


if __name__ == "__main__":
    main()

"""The job core's costs: submit latency, stream latency, throughput, relay rate, memory per live job.

    .venv/bin/python -m bench.jobs [--seconds 4] [--relay-tokens 20000] [--src PATH]

About a minute. What is measured, against real processes (uvicorn, their own
``RBEE_HOME``, default log level) with this process as the client:

* ``POST /v1/jobs`` latency for the queen's trivial ``status`` operation,
  sequential, over one keep-alive connection;
* POST -> first event: POST, then open the stream at once, until the first
  frame arrives;
* executor end -> ``[DONE]``: arrival of the ``end`` frame to arrival of
  ``data: [DONE]`` on the client (the seed's rule made this 2 s); the end
  event's ``duration_ms`` (job start to end, on the server) is reported too;
* jobs per second at concurrency 1, 32 and 256, of ``status`` jobs (POST
  plus the whole stream, each client on its own keep-alive connection), with
  the queen's CPU time per job;
* tokens relayed per second through the queen: a hive whose worker runs the
  fake engine (no delay, many tokens), one client reading the queen's stream
  of one ``infer`` job; and the time from POST to the first token of a
  one-token ``infer`` job (queen, worker and back: what rbee adds to a
  model's first token);
* resident memory per live job: an in-process ``JobRegistry`` holding 10 000
  ``infer`` jobs whose executor waits on an event (the queen has no job that
  stays live without workers), RSS delta / 10 000.

The client is a minimal HTTP/1.1 client on asyncio streams, not httpx, so the
figures are the server's and not the client library's: on two cores the
client would otherwise be the bottleneck. ``--src`` runs the servers from
another source tree (``PYTHONPATH``), to compare two versions side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import time
from typing import Any

import httpx
import psutil

from bench._util import (
    Conn,
    Server,
    command_line,
    free_port,
    goal,
    new_loop,
    percentile,
    print_goals,
    start_server,
    venv_bin,
    write_results,
)

__all__ = ["main", "stream_marks"]

OP_STATUS = b'{"operation":"status"}'
GOAL_POST_MS = 1.0
GOAL_FIRST_EVENT_MS = 5.0
GOAL_END_TO_DONE_MS = 5.0
GOAL_JOBS_PER_S = 1000.0
GOAL_RELAY_TOKENS_PER_S = 20_000.0
GOAL_KB_PER_JOB = 10.0


def stream_marks(marks: dict[str, float], chunk: bytes, arrival: float) -> bytes | None:
    """Record when a stream's first frame, ``end`` frame and ``[DONE]`` arrived; return the end's data."""
    end_data = None
    if "first" not in marks and b"id: " in chunk:
        marks["first"] = arrival
    if b"event: end\n" in chunk:
        marks["end"] = arrival
        end_data = chunk.split(b"event: end\ndata: ", 1)[1].split(b"\n", 1)[0]
    if b"data: [DONE]" in chunk:
        marks["done"] = arrival
    return end_data


async def post_job(conn: Conn, body: bytes = OP_STATUS) -> str:
    status, data = await conn.request("POST", "/v1/jobs", body)
    if status != 201:
        raise RuntimeError(f"POST /v1/jobs answered {status}: {data[:200]!r}")
    return str(json.loads(data)["job_id"])


async def run_job(conn: Conn) -> None:
    job_id = await post_job(conn)
    status, data = await conn.request("GET", f"/v1/jobs/{job_id}/stream")
    if status != 200 or not data.endswith(b"data: [DONE]\n\n"):
        raise RuntimeError(f"stream of {job_id} ended without [DONE] ({status})")


# -- measurements ----------------------------------------------------------------------------


async def measure_post(host: str, port: int, n: int) -> list[float]:
    conn = await Conn(host, port).open()
    try:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            job_id = await post_job(conn)
            samples.append((time.perf_counter() - t0) * 1000)
            # Drain the job so the next POST does not queue behind it.
            await conn.request("GET", f"/v1/jobs/{job_id}/stream")
        return samples
    finally:
        await conn.close()


async def measure_stream(host: str, port: int, n: int) -> dict[str, list[float]]:
    conn = await Conn(host, port).open()
    first_event: list[float] = []
    end_to_done: list[float] = []
    duration: list[float] = []
    try:
        for _ in range(n):
            marks: dict[str, float] = {}
            end_data: list[bytes] = []

            def on_chunk(
                chunk: bytes, t: float, marks: dict[str, float] = marks, end_data: list[bytes] = end_data
            ) -> None:
                data = stream_marks(marks, chunk, t)
                if data is not None:
                    end_data.append(data)

            t0 = time.perf_counter()
            job_id = await post_job(conn)
            await conn.request("GET", f"/v1/jobs/{job_id}/stream", on_chunk=on_chunk)
            first_event.append((marks["first"] - t0) * 1000)
            end_to_done.append((marks["done"] - marks["end"]) * 1000)
            duration.append(float(json.loads(end_data[0])["duration_ms"]))
    finally:
        await conn.close()
    return {"first_event_ms": first_event, "end_to_done_ms": end_to_done, "duration_ms": duration}


async def measure_throughput(host: str, port: int, concurrency: int, seconds: float) -> dict[str, float]:
    conns = [await Conn(host, port).open() for _ in range(concurrency)]
    done = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(conn: Conn) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await run_job(conn)
            latencies.append((time.perf_counter() - t0) * 1000)
            done += 1

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        elapsed = time.perf_counter() - t0
        for conn in conns:
            await conn.close()
    return {
        "concurrency": concurrency,
        "jobs": done,
        "seconds": round(elapsed, 3),
        "jobs_per_s": round(done / elapsed, 1),
        "job_p50_ms": round(percentile(latencies, 50), 3),
        "job_p99_ms": round(percentile(latencies, 99), 3),
    }


def _infer_op(max_tokens: int) -> bytes:
    return json.dumps({"operation": "infer", "model": "gemma3-270m", "prompt": "hi", "max_tokens": max_tokens}).encode()


async def infer_job(port: int, max_tokens: int) -> tuple[float, float, float, int]:
    """One ``infer`` job on a fresh connection: (POST sent, first token, [DONE], tokens)."""
    conn = await Conn("127.0.0.1", port).open()
    first: list[float] = []

    def on_chunk(chunk: bytes, arrival: float) -> None:
        if not first and b"event: token" in chunk:
            first.append(arrival)

    try:
        t0 = time.perf_counter()
        status, data = await conn.request("POST", "/v1/jobs", _infer_op(max_tokens))
        if status != 201:
            raise RuntimeError(f"POST /v1/jobs answered {status}: {data[:300]!r}")
        job_id = json.loads(data)["job_id"]
        status, body = await conn.request("GET", f"/v1/jobs/{job_id}/stream", on_chunk=on_chunk)
        t1 = time.perf_counter()
    finally:
        await conn.close()
    if not body.endswith(b"data: [DONE]\n\n") or not first:
        raise RuntimeError(f"the infer job did not stream its tokens: {body[-300:]!r}")
    return t0, first[0], t1, body.count(b"\nevent: token\n")


def fake_cluster(env: dict[str, str], tokens: int) -> tuple[Server, Server]:
    """A queen and a hive whose workers run the fake engine (``tokens`` pieces, no delay)."""
    qport, hport = free_port(), free_port()
    queen = start_server([venv_bin("queen-rbee"), "--host", "127.0.0.1", "--port", str(qport)], port=qport, env=env)
    try:
        hive = start_server(
            [
                venv_bin("rbee-hive"),
                *("--host", "127.0.0.1", "--port", str(hport), "--queen-url", queen.url, "--hive-id", "bench"),
                *("--worker-engine", "fake", "--heartbeat-interval", "0.5", "--worker-arg=--n-ctx=131072"),
            ],
            port=hport,
            env={**env, "RBEE_FAKE_TOKENS": str(tokens), "RBEE_FAKE_DELAY_MS": "0"},
        )
    except BaseException:
        queen.stop()
        raise
    deadline = time.monotonic() + 30
    while not httpx.get(queen.url + "/v1/info", timeout=5).json().get("hives"):
        if time.monotonic() > deadline:
            hive.stop()
            queen.stop()
            raise TimeoutError("the hive did not register with the queen")
        time.sleep(0.05)
    return queen, hive


async def measure_relay(port: int, tokens: int, runs: int, first_token_jobs: int) -> dict[str, Any]:
    await infer_job(port, 4)  # spawns the worker
    latencies = []
    for _ in range(first_token_jobs):
        t0, first, _, _ = await infer_job(port, 1)
        latencies.append((first - t0) * 1000)
    rates = []
    for _ in range(runs):
        _, first, done, n = await infer_job(port, tokens)
        rates.append(n / (done - first))
    return {
        "tokens": tokens,
        "tokens_per_s": [round(r, 1) for r in rates],
        "tokens_per_s_median": statistics.median(rates),
        "first_token_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "n": len(latencies)},
    }


def measure_memory_per_live_job(n: int) -> dict[str, Any]:
    """RSS growth of this process per live job, in an in-process registry."""
    from rbee import narration
    from rbee.contracts.events import JobStatus
    from rbee.contracts.operations import OperationBase, parse_operation
    from rbee.jobs import JobRegistry

    narration.configure_logging("warn")  # 10 000 job_start lines would measure the terminal
    body = b'{"operation":"infer","prompt":"Write a haiku about bees.","max_tokens":64}'

    async def probe() -> dict[str, Any]:
        registry = JobRegistry(actor="bench", max_live_jobs=n + 1000)
        gate = asyncio.Event()

        async def executor(op: OperationBase) -> None:
            await gate.wait()

        async def settle(jobs: list[Any]) -> None:
            # One pass of the loop runs every task's first step: all jobs are live after it.
            await asyncio.sleep(0)
            assert not any(j.status is JobStatus.QUEUED for j in jobs)

        warm = [registry.submit(parse_operation(body), executor) for _ in range(500)]
        await settle(warm)
        gate.set()
        await asyncio.gather(*(j.task for j in warm))
        registry.ttl_s = 0
        registry.sweep()
        del warm
        gate.clear()

        proc = psutil.Process()
        gc.collect()
        before = proc.memory_info().rss
        jobs = [registry.submit(parse_operation(body), executor) for _ in range(n)]
        await settle(jobs)
        gc.collect()
        after = proc.memory_info().rss
        live = registry.live
        gate.set()
        await asyncio.gather(*(j.task for j in jobs))
        return {"jobs": n, "live": live, "rss_before": before, "rss_after": after}

    result = asyncio.run(probe())
    result["bytes_per_job"] = round((result["rss_after"] - result["rss_before"]) / n, 1)
    return result


# -- the run ------------------------------------------------------------------------------------


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="time per throughput level")
    parser.add_argument("--posts", type=int, default=1000, help="sequential POSTs for the latency figures")
    parser.add_argument("--streams", type=int, default=300, help="sequential jobs for the stream figures")
    parser.add_argument("--live-jobs", type=int, default=10_000, help="live jobs for the memory figure")
    parser.add_argument("--relay-tokens", type=int, default=20_000, help="tokens of the relay-rate job")
    parser.add_argument("--log-level", default=None, help="the servers' RBEE_LOG_LEVEL (default: theirs, info)")
    parser.add_argument("--src", default=None, help="run the servers from this source tree (PYTHONPATH)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    env: dict[str, str] = {}
    if args.log_level:
        env["RBEE_LOG_LEVEL"] = args.log_level
    if args.src:
        env["PYTHONPATH"] = os.path.abspath(args.src)

    print(f"memory: {args.live_jobs} live jobs in an in-process registry ...", flush=True)
    memory = measure_memory_per_live_job(args.live_jobs)

    port = free_port()
    server = start_server([venv_bin("queen-rbee"), "--host", "127.0.0.1", "--port", str(port)], port=port, env=env)
    host = "127.0.0.1"
    queen = psutil.Process(server.pid)
    me = psutil.Process()
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            print(f"queen pid {server.pid} on port {port}; warming up ...", flush=True)
            runner.run(measure_throughput(host, port, 8, 1.0))
            print(f"POST latency: {args.posts} sequential POSTs ...", flush=True)
            posts = runner.run(measure_post(host, port, args.posts))
            print(f"stream latency: {args.streams} sequential jobs ...", flush=True)
            streams = runner.run(measure_stream(host, port, args.streams))
            levels = []
            for concurrency in (1, 32, 256):
                print(f"throughput at concurrency {concurrency} for {args.seconds:g} s ...", flush=True)
                cpu_q, cpu_c = _cpu_s(queen), _cpu_s(me)
                level = runner.run(measure_throughput(host, port, concurrency, args.seconds))
                cpu_q2, cpu_c2 = _cpu_s(queen), _cpu_s(me)
                level["server_cpu_share"] = round((cpu_q2 - cpu_q) / level["seconds"], 2)
                level["client_cpu_share"] = round((cpu_c2 - cpu_c) / level["seconds"], 2)
                level["server_cpu_us_per_job"] = round(1e6 * (cpu_q2 - cpu_q) / max(1, level["jobs"]), 1)
                levels.append(level)
        queen_rss = server.rss_bytes()
    finally:
        server.stop()

    print(f"relay: {args.relay_tokens} tokens from a fake worker through the queen ...", flush=True)
    fq, fh = fake_cluster(env, args.relay_tokens)
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            cpu_q = _cpu_s(psutil.Process(fq.pid))
            relay = runner.run(measure_relay(int(fq.url.rsplit(":", 1)[1]), args.relay_tokens, 3, 100))
            relay["queen_cpu_s"] = round(_cpu_s(psutil.Process(fq.pid)) - cpu_q, 3)
    finally:
        fh.stop()
        fq.stop()

    post_p50, post_p99 = percentile(posts, 50), percentile(posts, 99)
    first_p50, first_p99 = percentile(streams["first_event_ms"], 50), percentile(streams["first_event_ms"], 99)
    tail_p50, tail_p99 = percentile(streams["end_to_done_ms"], 50), percentile(streams["end_to_done_ms"], 99)
    dur_p50 = percentile(streams["duration_ms"], 50)
    kb_per_job = memory["bytes_per_job"] / 1024
    by_level = {lv["concurrency"]: lv for lv in levels}
    at32 = by_level[32]["jobs_per_s"]
    relay_rate = relay["tokens_per_s_median"]
    ft = relay["first_token_ms"]

    goals = [
        goal(
            "control: POST /v1/jobs latency p50",
            f"< {GOAL_POST_MS:g} ms",
            f"{post_p50:.3f} ms (p99 {post_p99:.2f})",
            post_p50 < GOAL_POST_MS,
            post_p50,
        ),
        goal(
            "control: POST -> first event p50",
            f"< {GOAL_FIRST_EVENT_MS:g} ms",
            f"{first_p50:.3f} ms (p99 {first_p99:.2f})",
            first_p50 < GOAL_FIRST_EVENT_MS,
            first_p50,
        ),
        goal(
            "control: executor end -> [DONE] p50",
            f"< {GOAL_END_TO_DONE_MS:g} ms",
            f"{tail_p50:.3f} ms (p99 {tail_p99:.3f})",
            tail_p50 < GOAL_END_TO_DONE_MS,
            tail_p50,
        ),
        goal(
            "control: jobs/s at concurrency 32 (status jobs)",
            f">= {GOAL_JOBS_PER_S:g}",
            f"{at32:.0f} ({by_level[32]['server_cpu_us_per_job']:.0f} us queen CPU/job)",
            at32 >= GOAL_JOBS_PER_S,
            at32,
        ),
        *(
            goal(
                f"control: jobs/s at concurrency {c} (status jobs)",
                "-",
                f"{by_level[c]['jobs_per_s']:.0f} (p50 {by_level[c]['job_p50_ms']:.1f} ms)",
                None,
                by_level[c]["jobs_per_s"],
            )
            for c in (1, 256)
        ),
        goal(
            "control: tokens/s relayed through the queen (fake worker)",
            f">= {GOAL_RELAY_TOKENS_PER_S:g}",
            f"{relay_rate:.0f}",
            relay_rate >= GOAL_RELAY_TOKENS_PER_S,
            relay_rate,
        ),
        goal(
            "control: POST -> first token, 1-token infer (fake worker)",
            "-",
            f"{ft['p50']:.2f} ms (p99 {ft['p99']:.2f})",
            None,
            ft["p50"],
        ),
        goal(
            "control: memory per live job (10 000 live)",
            f"<= {GOAL_KB_PER_JOB:g} KB",
            f"{kb_per_job:.2f} KB",
            kb_per_job <= GOAL_KB_PER_JOB,
            kb_per_job,
        ),
    ]
    print(f"\n$ {command_line()}\n")
    print_goals(goals)
    print()
    for lv in levels:
        print(
            f"  concurrency {lv['concurrency']:>3}: {lv['jobs']} jobs in {lv['seconds']} s;"
            f" CPU share queen {lv['server_cpu_share']}, client {lv['client_cpu_share']};"
            f" queen CPU {lv['server_cpu_us_per_job']:.0f} us/job"
        )
    print(f"  relay runs (tokens/s): {relay['tokens_per_s']}; job duration_ms (server) p50 {dur_p50:.3f}")
    print(f"  queen RSS after the run: {queen_rss / 2**20:.1f} MiB; machine: {os.cpu_count()} CPUs")
    result = {
        "operation": "status (queen, trivial)",
        "queen_log_level": args.log_level or "info (default)",
        "src": args.src,
        "client": "raw HTTP/1.1 keep-alive on asyncio streams (uvloop), one process",
        "post_ms": {"p50": post_p50, "p99": post_p99, "n": len(posts)},
        "first_event_ms": {"p50": first_p50, "p99": first_p99, "n": len(streams["first_event_ms"])},
        "end_to_done_ms": {"p50": tail_p50, "p99": tail_p99, "max": max(streams["end_to_done_ms"])},
        "job_duration_ms": {"p50": dur_p50, "p99": percentile(streams["duration_ms"], 99)},
        "throughput": levels,
        "relay": relay,
        "memory_per_live_job": {**memory, "kb_per_job": round(kb_per_job, 3), "where": "in-process JobRegistry"},
        "queen_rss_after_bytes": queen_rss,
        "goals": goals,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    path = write_results("jobs", result)
    print(f"  results: {os.path.relpath(path)} ({result['elapsed_s']:.0f} s in all)")
    return result


if __name__ == "__main__":
    main()

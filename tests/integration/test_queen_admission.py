"""Admission in the queen: a hive job started during the POST rides on the job's ticket.

A forwarded operation is handed to its hive while the client's POST is open.
The hive job is then followed by the queen job (never submitted twice), and a
job that is refused after admission, or ends before it ran, cancels it: no
hive job is left running for a queen job that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rbee.contracts.operations import WorkerList
from rbee.queen.app import QueenSettings, create_queen_app

pytestmark = pytest.mark.timeout(30)


class RecordingHive:
    """A stand-in hive that takes every job, ends it at once, and records what it was asked."""

    def __init__(self) -> None:
        #: Seconds each POST takes before the hive answers it.
        self.delay_s = 0.0
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        lock = threading.Lock()
        hive = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                time.sleep(hive.delay_s)
                with lock:
                    job_id = f"job-hive-{len(hive.submitted) + 1}"
                    hive.submitted.append(job_id)
                self._json(201, {"job_id": job_id, "sse_url": f"/v1/jobs/{job_id}/stream"})

            def do_GET(self) -> None:
                job_id = self.path.split("/")[3]
                end = json.dumps({"job_id": job_id, "status": "completed", "error": None, "duration_ms": 1.0})
                body = f"id: 1\nevent: end\ndata: {end}\n\ndata: [DONE]\n\n".encode()
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_DELETE(self) -> None:
                with lock:
                    hive.cancelled.append(self.path.split("/")[3])
                self._json(202, {"status": "cancelled"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def hive() -> Iterator[RecordingHive]:
    hive = RecordingHive()
    hive.thread.start()
    try:
        yield hive
    finally:
        hive.server.shutdown()
        hive.server.server_close()


@contextlib.asynccontextmanager
async def queen(home: Path, hive: RecordingHive) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_queen_app(QueenSettings(home=home))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://queen") as client,
    ):
        beat = {"hive_id": "alpha", "url": hive.url}
        assert (await client.post("/v1/hives/heartbeat", json=beat)).status_code == 200
        yield app, client


async def until(condition: Any) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - the fake hive records from its own threads
            await asyncio.sleep(0.01)


async def test_the_job_follows_the_hive_job_its_admission_started(tmp_path: Path, hive: RecordingHive) -> None:
    async with queen(tmp_path, hive) as (_, client):
        created = await client.post("/v1/jobs", json={"operation": "worker_list", "hive_id": "alpha"})
        assert created.status_code == 201, created.text
        stream = await client.get(f"/v1/jobs/{created.json()['job_id']}/stream")
        assert '"status":"completed"' in stream.text
    assert hive.submitted == ["job-hive-1"]  # submitted once, during the POST
    assert hive.cancelled == []


async def test_a_job_refused_after_admission_cancels_its_hive_job(tmp_path: Path, hive: RecordingHive) -> None:
    async with queen(tmp_path, hive) as (app, client):
        app.state.queen.registry.max_live_jobs = 0  # the registry refuses every job
        before = len((await client.get("/v1/jobs")).json()["jobs"])
        refused = await client.post("/v1/jobs", json={"operation": "worker_list", "hive_id": "alpha"})
        assert refused.status_code == 429, refused.text
        # Cancelled before the POST was answered: no orphan waits for a later sweep.
        assert hive.submitted == ["job-hive-1"] and hive.cancelled == ["job-hive-1"]
        assert len((await client.get("/v1/jobs")).json()["jobs"]) == before


async def test_a_job_cancelled_before_it_ran_cancels_its_hive_job(tmp_path: Path, hive: RecordingHive) -> None:
    async with queen(tmp_path, hive) as (app, _):
        state = app.state.queen
        state.jobs.durable = None  # answer at once, before the job's task takes its first step
        job = await state.jobs.submit(WorkerList(hive_id="alpha"))
        state.registry.cancel(job.id)
        await state.registry.wait(job)
        assert job.status.value == "cancelled"
        await until(lambda: hive.cancelled)
    assert hive.submitted == ["job-hive-1"] and hive.cancelled == ["job-hive-1"]


async def test_two_admissions_of_equal_operations_keep_their_own_hive_jobs(tmp_path: Path, hive: RecordingHive) -> None:
    # Equal operations, even one object submitted twice, are two tickets: nothing is looked up by identity.
    async with queen(tmp_path, hive) as (app, _):
        state = app.state.queen
        op = WorkerList(hive_id="alpha")
        jobs = [await state.jobs.submit(op), await state.jobs.submit(op)]
        for job in jobs:
            await state.registry.wait(job)
        assert [job.status.value for job in jobs] == ["completed", "completed"]
    assert sorted(hive.submitted) == ["job-hive-1", "job-hive-2"] and hive.cancelled == []


async def test_a_post_given_up_on_cancels_the_hive_job_once_it_lands(
    tmp_path: Path, hive: RecordingHive, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rbee.queen.router

    monkeypatch.setattr(rbee.queen.router, "PRESUBMIT_TIMEOUT_S", 0.2)
    hive.delay_s = 0.6  # the hive takes the job after the POST stopped waiting for it
    async with queen(tmp_path, hive) as (_, client):
        response = await client.post("/v1/jobs", json={"operation": "worker_list", "hive_id": "alpha"})
        assert response.status_code == 502 and "did not take the operation" in response.text
        await until(lambda: hive.cancelled)
    assert hive.submitted == ["job-hive-1"] and hive.cancelled == ["job-hive-1"]


async def test_a_client_gone_during_admission_leaves_no_hive_job(tmp_path: Path, hive: RecordingHive) -> None:
    hive.delay_s = 0.4
    async with queen(tmp_path, hive) as (app, _):
        posting = asyncio.ensure_future(app.state.queen.jobs.submit(WorkerList(hive_id="alpha")))
        await asyncio.sleep(0.1)  # the hive has the POST and has not answered yet
        posting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await posting
        await until(lambda: hive.cancelled)
        assert app.state.queen.registry.live == 0
    assert hive.submitted == ["job-hive-1"] and hive.cancelled == ["job-hive-1"]

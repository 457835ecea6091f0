"""The hive inside another process's event loop: direct heartbeats, real workers, clean stops."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import psutil
from httpx_sse import aconnect_sse

from rbee.contracts import DEFAULT_MODEL
from rbee.contracts.operations import WorkerSpawn
from rbee.hive.embedded import EmbeddedHive
from rbee.jobs.client import JobClient
from rbee.queen.app import QueenSettings, create_queen_app
from rbee.queen.telemetry import Telemetry


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def eventually(predicate: Any, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.02)


async def spawn(client: JobClient) -> dict[str, Any]:
    job_id = await client.submit(WorkerSpawn(model=DEFAULT_MODEL))
    end: dict[str, Any] = {}
    async with asyncio.timeout(60):
        async for event in client.events(job_id):
            if event.kind == "end":
                end = event.data
    assert end["status"] == "completed", end
    worker: dict[str, Any] = end["worker"]
    return worker


async def test_embedded_hive_reports_directly_and_stops_cleanly(tmp_path: Path) -> None:
    telemetry = Telemetry(interval_s=0.5)
    hive = EmbeddedHive(
        queen_url="http://127.0.0.1:9",  # unused: heartbeats go through deliver
        port=0,
        home=tmp_path,
        options={"worker_engine": "fake", "heartbeat_interval_s": 0.5},
        deliver=lambda beat: telemetry.heartbeat(beat),
    )
    await hive.start()
    try:
        # start() returned after the first heartbeat arrived.
        view = telemetry.hive("localhost")
        assert view.url == hive.url
        assert view.has_model(DEFAULT_MODEL)
        async with JobClient(hive.url) as client:
            doomed = await spawn(client)
            kept = await spawn(client)
        await eventually(lambda: {doomed["worker_id"], kept["worker_id"]} <= set(telemetry.hive("localhost").workers))

        os.kill(doomed["pid"], signal.SIGKILL)
        await eventually(lambda: doomed["worker_id"] not in telemetry.hive("localhost").workers, timeout_s=5)
        assert kept["worker_id"] in telemetry.hive("localhost").workers
    finally:
        await hive.stop()
    assert gone(kept["pid"])
    assert telemetry.hive("localhost").workers == {}  # the last heartbeat said so
    async with httpx.AsyncClient() as http:
        try:
            await http.get(f"{hive.url}/health", timeout=2)
            raise AssertionError("the hive still answers after stop()")
        except httpx.ConnectError:
            pass


async def test_queen_with_a_local_hive_runs_infer_end_to_end(tmp_path: Path) -> None:
    settings = QueenSettings(home=tmp_path, local_hive=True, hive_options={"worker_engine": "fake"})
    app = create_queen_app(settings)
    pids: list[int] = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://queen") as client:
            response = await client.post("/v1/jobs", json={"operation": "infer", "prompt": "Hello", "max_tokens": 8})
            assert response.status_code == 201, response.text
            job_id = response.json()["job_id"]
            events: list[tuple[str, Any]] = []
            async with asyncio.timeout(60):
                async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/stream") as source:
                    async for sse in source.aiter_sse():
                        if sse.data == "[DONE]":
                            break
                        events.append((sse.event, json.loads(sse.data)))
        end = events[-1][1]
        assert end["status"] == "completed", end
        assert any(kind == "token" for kind, _ in events)
        actions = [data["action"] for kind, data in events if kind == "narration"]
        assert "infer_spawn" in actions and "worker_ready" in actions
        pids = [w.report.pid for w in app.state.queen.telemetry.workers() if w.report.pid]
        assert pids
    assert all(gone(pid) for pid in pids)


async def test_start_does_not_wait_for_an_unreachable_queen(tmp_path: Path) -> None:
    # Over HTTP the queen may not listen yet (it starts its hive first): the first attempt is enough.
    hive = EmbeddedHive(queen_url="http://127.0.0.1:9", home=tmp_path, options={"heartbeat_interval_s": 0.2})
    await hive.start()
    try:
        beat = hive.state.heartbeat
        assert beat is not None and beat.attempted.is_set() and beat.sent == 0
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{hive.url}/health")).json()["hive_id"] == "localhost"
    finally:
        await hive.stop()

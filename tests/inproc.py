"""A queen whose one worker is a scripted fake one, both in process (no sockets): the
API tests of the queen's routes use it (``with_worker``), and ``in_process`` points a
queen's HTTP client at a worker app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from rbee.queen.app import QueenSettings, create_queen_app
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.fake import FakeEngine

__all__ = ["MODEL", "MODEL_ID", "in_process", "with_worker"]

MODEL = "gemma3-270m"
MODEL_ID = "gemma-3-270m-q4_k_m"


@contextlib.asynccontextmanager
async def with_worker(
    tmp_path: Path, pieces: list[str], *, chat_tools: bool = False
) -> AsyncIterator[tuple[FakeEngine, httpx.AsyncClient]]:
    """A queen whose one worker is a fake one in process (``chat_tools``: its model's template renders tools)."""
    engine = FakeEngine(model_id=MODEL_ID, pieces=pieces)
    worker = create_worker_app(engine, WorkerSettings(worker_id="w1", aliases=[MODEL]))
    app = create_queen_app(QueenSettings(home=tmp_path))
    async with (
        worker.router.lifespan_context(worker),
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://queen") as client,
    ):
        await in_process(app, worker)
        await asyncio.wait_for(worker.state.worker.load_done.wait(), 10)  # the model is loaded
        report: dict[str, Any] = {"worker_id": "w1", "model": MODEL_ID, "model_aliases": [MODEL], "state": "ready"}
        report |= {"url": "http://worker", "n_ctx": 4096}
        models = [{"id": MODEL_ID, "alias": MODEL, "chat_tools": chat_tools}]
        beat = {"hive_id": "alpha", "url": "http://hive", "models": models}
        assert (await client.post("/v1/hives/heartbeat", json={**beat, "workers": [report]})).status_code == 200
        yield engine, client


async def in_process(app: FastAPI, worker: FastAPI) -> None:
    """The queen's HTTP client reaches ``worker`` in process (its HTTP/1.1 pool, for real sockets, is closed)."""
    http = app.state.queen.http
    http._transport = httpx.ASGITransport(worker)
    pool = getattr(http, "http1", None)
    if pool is not None:
        await pool.aclose()

"""The queen's web page: a static shell and a live feed of the cluster.

``GET /`` and ``GET /static/{name}`` serve the page shipped in the package
(no build step). They are the only paths besides ``/health`` reachable without
the queen's token: a browser navigation cannot send an ``Authorization``
header, and a token in the URL would leak into history, logs and referrers.
The shell holds no cluster data; it asks for the token, keeps it for the tab
and sends it as a bearer header on every request, SSE included.

``GET /v1/cluster/events`` is an SSE stream of ``cluster`` snapshots: hives,
workers (with the queen job each one runs), queue depth per model, models,
recent jobs. A snapshot is sent when something changed (a heartbeat, a job
created or ended, a worker chosen) and at least every :data:`KEEPALIVE_S`, so
the page never polls and notices a dead connection. Where a live job is (its
step and its worker) is what the scheduler published
(:mod:`rbee.queen.placements`); the page never reads a job's narration back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from rbee.errors import RbeeError
from rbee.jobs.record import JobRecord
from rbee.queen.placements import Placements
from rbee.queen.scheduler import Scheduler
from rbee.queen.telemetry import Telemetry
from rbee.server.sse import EventStream, ServerSentEvent

__all__ = ["ClusterPage", "cluster_snapshot", "snapshot_events", "web_router", "PUBLIC_PATHS", "TICK_S", "KEEPALIVE_S"]

#: Paths served without the token (see :class:`rbee.http.BearerAuth`).
PUBLIC_PATHS = ("/", "/static/*")
#: How often a connected page's snapshot is rebuilt to catch changes nobody announces (stale hives, queue moves).
TICK_S = 1.0
#: The longest a page goes without a snapshot.
KEEPALIVE_S = 5.0
#: Recent jobs per snapshot.
RECENT_JOBS = 15
#: Bursts of changes (a job ending, then a heartbeat) go out as one frame.
_COALESCE_S = 0.05

_STATIC = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
_SECURITY_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
}
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


class ClusterPage:
    """What the page shows, from the parts that know it: the hives and workers
    (telemetry), the queen's own load (scheduler), where each live job is
    (placements) and the recent jobs (``history``: the newest records)."""

    def __init__(
        self,
        telemetry: Telemetry,
        scheduler: Scheduler,
        placements: Placements,
        history: Callable[[int], list[JobRecord]],
    ) -> None:
        self.telemetry = telemetry
        self.scheduler = scheduler
        self.placements = placements
        self.history = history

    def snapshot(self) -> dict[str, Any]:
        return cluster_snapshot(self)


def _prompt_preview(payload: dict[str, Any]) -> str | None:
    prompt = payload.get("prompt")
    if not isinstance(prompt, str):
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            return None
        prompt = str(messages[-1].get("content", ""))  # a chat: its last turn
    line = " ".join(prompt.split())
    return line if len(line) <= 80 else line[:79] + "\u2026"


def _worker_state(reported: str, running_here: bool) -> str:
    # Busy or idle as the queen knows it now: the hive's report is up to one heartbeat old.
    if reported in ("ready", "busy"):
        return "busy" if running_here else "ready"
    return reported


#: What the page shows of a model, when its hive reports it.
_MODEL_FACTS = ("chat_template", "context_length", "size_bytes", "quantization")


def _models(hives: list[dict[str, Any]], workers: list[dict[str, Any]], queues: dict[str, int]) -> list[dict[str, Any]]:
    """One entry per model, named as people type it (the alias when there is one)."""
    models: dict[str, dict[str, Any]] = {}
    name_of: dict[str, str] = {}  # any id or alias -> the entry's name

    def entry(name: str, model_id: str) -> dict[str, Any]:
        name_of.setdefault(model_id, name)
        name_of.setdefault(name, name)
        return models.setdefault(name, {"name": name, "id": model_id, "hives": [], "workers": 0, "queue": 0})

    for hive in hives:
        for m in hive["models"]:
            model = entry(m.get("alias") or m["id"], m["id"])
            model["hives"].append(hive["hive_id"])
            for key in _MODEL_FACTS:  # only when a hive says (the first hive that does)
                if m.get(key) is not None:
                    model.setdefault(key, m[key])
    for w in workers:
        known = [name_of[n] for n in (w["model"], *w["aliases"]) if n in name_of]
        name = known[0] if known else (w["aliases"] or [w["model"]])[0]
        entry(name, w["model"])["workers"] += 1
    for asked, depth in queues.items():
        entry(name_of.get(asked, asked), asked)["queue"] += depth
    return sorted(models.values(), key=lambda m: m["name"])


def cluster_snapshot(page: ClusterPage) -> dict[str, Any]:
    """Everything the page shows, from the queen's own state (no I/O but the history)."""
    snap = page.telemetry.snapshot()
    live = {entry.job.id: entry for entry in page.placements.live()}
    on_worker = {entry.worker_id: entry for entry in live.values() if entry.worker_id}
    for hive in snap["hives"]:
        hive.pop("last_heartbeat_s_ago", None)  # the page ages it; a changing number would defeat change detection
    inflight: dict[str, int] = page.scheduler.inflight
    workers = []
    for w in snap["workers"]:
        entry = on_worker.get(w["worker_id"])
        busy = inflight.get(w["worker_id"], 0)
        running_here = entry is not None or busy > 0
        workers.append(
            {
                "worker_id": w["worker_id"],
                "hive_id": w["hive_id"],
                "hive_state": w["hive_state"],
                "model": w["model"],
                "aliases": w.get("model_aliases", []),
                "device": w.get("device"),
                "state": _worker_state(w["state"], running_here),
                "pid": w.get("pid"),
                "url": w.get("url"),
                "slots": w.get("slots"),
                # The queen's own count (the hive's is a heartbeat old); a job it knows runs here is at least one.
                "busy_slots": max(busy, 1) if running_here else 0,
                "n_ctx": w.get("n_ctx"),
                "started_at": w.get("started_at"),
                "current_job": entry.job.id if entry is not None else None,
                "keep_alive_s": w.get("keep_alive_s"),
                # Idle and unload times are the hive's; while the queen runs a job here it is neither.
                "idle_since": None if running_here else w.get("idle_since"),
                "unloads_at": None if running_here else w.get("unloads_at"),
                "memory_bytes": w.get("memory_bytes"),
            }
        )
    queues: dict[str, int] = page.scheduler.queue_depths()
    models = _models(snap["hives"], workers, queues)
    jobs = []
    for record in page.history(RECENT_JOBS):
        entry = live.get(record.job_id)
        payload = record.payload or {}
        job = {
            "job_id": record.job_id,
            "operation": record.operation,
            "status": record.status,
            "created_at": record.created_at,
            "duration_ms": record.duration_ms,
            "tokens_out": record.tokens_out,
            "error": record.error,
            "model": payload.get("model"),
            "prompt": _prompt_preview(payload),
            "worker_id": record.worker_id,
            "hive_id": record.hive_id,
        }
        if entry is not None:
            job.update(
                status=entry.job.status.value,
                phase=entry.step.value,
                tokens_out=entry.job.tokens,
                worker_id=entry.worker_id,
                hive_id=entry.hive_id,
            )
        jobs.append(job)
    return {
        "hives": snap["hives"],
        "workers": workers,
        "queues": queues,
        "models": models,
        "jobs": jobs,
        "jobs_live": len(live),
    }


async def _watch_changes(telemetry: Telemetry, wake: asyncio.Event) -> None:
    # Always waiting, so a change announced while the stream is busy elsewhere
    # (building a snapshot, sending one) is still seen.
    while True:
        await telemetry.changed(3600.0)
        wake.set()


async def snapshot_events(page: ClusterPage, *, tick_s: float, keepalive_s: float) -> AsyncIterator[ServerSentEvent]:
    """``cluster`` events: one at once, then on every change and at least every ``keepalive_s``.

    The response ends this generator when the client goes or the server shuts down.
    """
    wake = asyncio.Event()
    watcher = asyncio.create_task(_watch_changes(page.telemetry, wake), name="web:cluster-changes")
    last = ""
    sent_at = float("-inf")
    seq = 0
    try:
        while True:
            wake.clear()
            body = _dumps(page.snapshot())
            now = time.monotonic()
            if body != last or now - sent_at >= keepalive_s:
                seq += 1
                last, sent_at = body, now
                # ``now`` lets the page age heartbeats against the queen's clock, not its own.
                data = body[:-1] + f',"now":{time.time():.3f}}}'
                yield ServerSentEvent(data=data, event="cluster", id=seq)
            wait = min(tick_s, max(0.0, keepalive_s - (time.monotonic() - sent_at)))
            try:
                await asyncio.wait_for(wake.wait(), wait)
            except TimeoutError:
                pass
            await asyncio.sleep(_COALESCE_S)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


class _Asset:
    __slots__ = ("body", "etag", "media_type")

    def __init__(self, name: str) -> None:
        self.body = (resources.files("rbee.queen") / "static" / name).read_bytes()
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'
        self.media_type = _STATIC[name] + "; charset=utf-8"

    def response(self, request: Request) -> Response:
        headers = {**_SECURITY_HEADERS, "ETag": self.etag}
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


class _NoAsset(RbeeError):
    """No such file in the web page."""

    status_code = 404
    kind = "not_found"


def web_router(
    get_state: Callable[[Request], ClusterPage], *, tick_s: float = TICK_S, keepalive_s: float = KEEPALIVE_S
) -> APIRouter:
    """The page (``/``, ``/static/...``) and the cluster feed (``/v1/cluster/events``)."""
    router = APIRouter(tags=["web"])
    assets: dict[str, _Asset] = {}

    def asset(name: str) -> _Asset:
        if name not in _STATIC:
            raise _NoAsset(f"no file {name!r} in the web page")
        if name not in assets:  # read once, on first use
            assets[name] = _Asset(name)
        return assets[name]

    @router.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        return asset("index.html").response(request)

    @router.head("/", include_in_schema=False)
    async def alive(request: Request) -> Response:
        """Ollama's clients ask ``HEAD /`` whether the server is up before anything else."""
        return Response(status_code=200, media_type="text/html; charset=utf-8")

    @router.get("/static/{name}", include_in_schema=False)
    async def static(request: Request, name: str) -> Response:
        return asset(name).response(request)

    @router.get(
        "/v1/cluster/events",
        summary="Cluster snapshots (text/event-stream), on change and at least every few seconds",
        response_class=Response,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def cluster_events(request: Request) -> EventStream:
        state = get_state(request)
        # No pings: snapshots themselves arrive at least every keepalive_s.
        return EventStream(snapshot_events(state, tick_s=tick_s, keepalive_s=keepalive_s), ping_s=None)

    return router

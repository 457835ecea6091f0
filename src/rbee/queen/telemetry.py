"""The queen's view of the cluster, fed by hive heartbeats.

A hive not heard from for three heartbeat intervals is ``stale`` and its
workers are not scheduled; after :attr:`Telemetry.forget_after_s` it is
forgotten. A queen restart loses nothing: the next heartbeat re-registers the
hive with its workers. A hive that says ``goodbye`` (its last heartbeat, as it
stops) is ``offline`` at once: nothing is scheduled on it, and it is forgotten
like a silent one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from rbee.contracts.cluster import Heartbeat, HostMemory, ModelReport, WorkerReport
from rbee.errors import HiveNotFound, HiveOffline

__all__ = ["Telemetry", "HiveView", "WorkerView", "Heartbeat", "WorkerReport", "ModelReport"]


@dataclass
class WorkerView:
    hive_id: str
    report: WorkerReport
    #: The worker's own bearer token (from its hive), never shown to clients.
    token: str | None = field(default=None, repr=False)

    @property
    def worker_id(self) -> str:
        return self.report.worker_id

    def serves(self, model: str) -> bool:
        return model == self.report.model or model in self.report.model_aliases


@dataclass
class HiveView:
    hive_id: str
    url: str
    version: str | None
    interval_s: float
    devices: list[dict[str, Any]]
    models: list[ModelReport]
    workers: dict[str, WorkerView]
    first_seen: float
    last_seen: float  # monotonic
    last_seen_wall: float
    heartbeats: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    memory: HostMemory | None = None
    #: The hive said goodbye (it stopped).
    gone: bool = False

    def age_s(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.last_seen

    def has_model(self, model: str) -> bool:
        return any(model in (m.id, m.alias) for m in self.models)

    def model(self, model: str) -> ModelReport | None:
        return next((m for m in self.models if model in (m.id, m.alias)), None)


class Telemetry:
    def __init__(self, *, interval_s: float = 2.0, stale_after_intervals: int = 3, forget_after_s: float = 60.0):
        self.interval_s = interval_s
        self.stale_after_s = interval_s * stale_after_intervals
        self.forget_after_s = forget_after_s
        self._hives: dict[str, HiveView] = {}
        self._changed = asyncio.Event()

    def heartbeat(self, beat: Heartbeat) -> tuple[HiveView, bool]:
        """Record a heartbeat; returns the hive and whether it is new to this queen."""
        now = time.monotonic()
        old = self._hives.get(beat.hive_id)
        view = HiveView(
            hive_id=beat.hive_id,
            url=beat.url.rstrip("/"),
            version=beat.version,
            interval_s=beat.interval_s,
            devices=beat.devices,
            models=beat.models,
            workers={
                w.worker_id: WorkerView(beat.hive_id, w, beat.worker_tokens.get(w.worker_id)) for w in beat.workers
            },
            first_seen=old.first_seen if old else time.time(),
            last_seen=now,
            last_seen_wall=time.time(),
            heartbeats=(old.heartbeats + 1) if old else 1,
            memory=beat.memory,
            gone=beat.goodbye,
        )
        if beat.goodbye:
            view.workers = {}
        self._hives[beat.hive_id] = view
        self.notify()
        came_back = old is None or old.gone or old.age_s(now) > self.stale_after_s
        return view, came_back and not beat.goodbye

    def notify(self) -> None:
        """Wake everyone waiting for the cluster to change."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            pass

    def state_of(self, hive: HiveView, now: float | None = None) -> str:
        if hive.gone:
            return "offline"
        return "online" if hive.age_s(now) <= self.stale_after_s else "stale"

    def offline(self, hive: HiveView) -> HiveOffline:
        """The error for an operation that names a hive whose heartbeats stopped."""
        if hive.gone:
            return HiveOffline(
                f"hive_id: hive {hive.hive_id!r} stopped {hive.age_s():.0f} s ago; it is offline"
                " (`rbee hive list` shows the hives)",
                hive_id=hive.hive_id,
            )
        return HiveOffline(
            f"hive_id: hive {hive.hive_id!r} has not sent a heartbeat for {hive.age_s():.0f} s;"
            " it is offline (`rbee hive list` shows the hives)",
            hive_id=hive.hive_id,
        )

    def hive(self, hive_id: str) -> HiveView:
        hive = self._hives.get(hive_id)
        if hive is None:
            known = ", ".join(sorted(self._hives)) or "none"
            raise HiveNotFound(f"no hive {hive_id!r} is known to the queen (known: {known})", hive_id=hive_id)
        return hive

    def hives(self) -> list[HiveView]:
        return list(self._hives.values())

    def fresh_hives(self) -> list[HiveView]:
        now = time.monotonic()
        return [h for h in self._hives.values() if not h.gone and h.age_s(now) <= self.stale_after_s]

    def workers(self, *, fresh_only: bool = True) -> list[WorkerView]:
        hives = self.fresh_hives() if fresh_only else self.hives()
        return [w for h in hives for w in h.workers.values()]

    def put_worker(self, hive_id: str, report: WorkerReport, token: str | None = None) -> None:
        """Record a worker learned outside a heartbeat (e.g. just spawned)."""
        hive = self._hives.get(hive_id)
        if hive is not None:
            hive.workers[report.worker_id] = WorkerView(hive_id, report, token)
            self.notify()

    def drop_worker(self, hive_id: str, worker_id: str) -> None:
        hive = self._hives.get(hive_id)
        if hive is not None and hive.workers.pop(worker_id, None) is not None:
            self.notify()

    def sweep(self) -> list[str]:
        now = time.monotonic()
        gone = [hid for hid, h in self._hives.items() if h.age_s(now) > self.forget_after_s]
        for hid in gone:
            del self._hives[hid]
        if gone:
            self.notify()
        return gone

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        hives = []
        for h in self._hives.values():
            hives.append(
                {
                    "hive_id": h.hive_id,
                    "url": h.url,
                    "state": self.state_of(h, now),
                    "last_heartbeat_s_ago": round(h.age_s(now), 3),
                    "last_heartbeat_at": h.last_seen_wall,
                    "version": h.version,
                    "devices": h.devices,
                    "models": [m.model_dump(exclude_none=True) for m in h.models],
                    "workers": [w.report.worker_id for w in h.workers.values()],
                    "memory": h.memory.model_dump() if h.memory is not None else None,
                }
            )
        workers = [
            {"hive_id": w.hive_id, "hive_state": self.state_of(self._hives[w.hive_id], now), **w.report.model_dump()}
            for h in self._hives.values()
            for w in h.workers.values()
        ]
        return {"hives": hives, "workers": workers}

"""Placement by memory in the queen's scheduler, from hand-made telemetry.

A :class:`FakeHive` stands in for a hive: it sends heartbeats (its RAM, each
GPU's VRAM, its workers and what a worker of each model needs) straight into
the queen's telemetry, and answers the queen's ``worker_spawn`` and
``worker_stop`` jobs over an in-process transport, moving its GPU's free
memory by the estimate of the worker it starts or stops. Jobs run through a
real :class:`JobRegistry`; each holds its worker until the test ends it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from rbee import errors
from rbee.contracts.cluster import GpuMemory, Heartbeat, HostMemory, ModelReport, WorkerReport
from rbee.contracts.operations import Infer
from rbee.jobs import JobRegistry
from rbee.jobs.job import Job
from rbee.jobs.registry import current_job
from rbee.queen import scheduler as scheduler_module
from rbee.queen.scheduler import Lease, Scheduler, _Evict, _Wait
from rbee.queen.telemetry import Telemetry

GiB, MiB = 2**30, 2**20
HIVE = "gpu-box"


@dataclass
class FakeHive:
    """One hive's heartbeats and its answers to worker_spawn / worker_stop."""

    telemetry: Telemetry
    needs: dict[str, int]
    gpus: list[GpuMemory] = field(default_factory=list)
    ram_available: int = 64 * GiB
    limit: int | None = None
    workers: dict[str, WorkerReport] = field(default_factory=dict)
    spawned: list[tuple[str, str]] = field(default_factory=list)  # (model, device)
    stopped: list[str] = field(default_factory=list)
    _ends: dict[str, dict[str, Any]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def add(self, worker_id: str, model: str, device: str = "cpu", *, last_used_s_ago: float = 0.0) -> None:
        now = time.time()
        self.workers[worker_id] = WorkerReport(
            worker_id=worker_id,
            model=model,
            device=device,
            state="ready",
            url=f"http://{worker_id}.invalid",
            slots=2,
            started_at=now - 1000,
            idle_since=now - last_used_s_ago,
        )

    def beat(self) -> None:
        memory = HostMemory(
            total_bytes=64 * GiB, available_bytes=self.ram_available, gpus=self.gpus, limit_bytes=self.limit
        )
        models = [ModelReport(id=m, worker_memory_bytes=n) for m, n in self.needs.items()]
        beat = Heartbeat(
            hive_id=HIVE, url="http://hive.invalid", workers=list(self.workers.values()), models=models, memory=memory
        )
        self.telemetry.heartbeat(beat)

    def _vram(self, device: str, delta: int) -> None:
        self.gpus = [
            g.model_copy(update={"free_bytes": g.free_bytes + delta}) if f"cuda:{g.index}" == device else g
            for g in self.gpus
        ]

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/v1/jobs":
            op = json.loads(request.content)
            if op["operation"] == "worker_stop":
                gone = self.workers.pop(op["worker_id"])
                self.stopped.append(gone.worker_id)
                self._vram(gone.device, self.needs[gone.model])
                end: dict[str, Any] = {"status": "completed", "error": None}
            else:
                assert op["operation"] == "worker_spawn", op
                worker_id = f"w-{op['model']}-{len(self.spawned)}"
                self.spawned.append((op["model"], op["device"]))
                self.add(worker_id, op["model"], op["device"])
                self._vram(op["device"], -self.needs[op["model"]])
                end = {"status": "completed", "error": None, "worker": self.workers[worker_id].model_dump()}
            job_id = f"hive-job-{next(self._ids)}"
            self._ends[job_id] = end
            self.beat()  # a hive sends a heartbeat at once when a worker starts or exits
            return httpx.Response(201, json={"job_id": job_id})
        if request.method == "GET" and request.url.path.endswith("/stream"):
            job_id = request.url.path.split("/")[3]
            body = f"id: 1\nevent: end\ndata: {json.dumps(self._ends[job_id])}\n\ndata: [DONE]\n\n"
            return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})
        return httpx.Response(404, json={"error": {"kind": "not_found", "message": request.url.path}})


@dataclass
class Queen:
    scheduler: Scheduler
    hive: FakeHive
    registry: JobRegistry
    leases: dict[str, Lease] = field(default_factory=dict)
    finish: dict[str, asyncio.Event] = field(default_factory=dict)

    def infer(self, model: str, **fields: Any) -> Job:
        """Submit an infer job that takes a worker and holds it until :meth:`end` (as a running job does)."""
        op = Infer(model=model, prompt="hi", max_tokens=2, **fields)

        async def hold(operation: Any) -> None:
            job_id = current_job().id
            done = self.finish.setdefault(job_id, asyncio.Event())
            lease = await self.scheduler.acquire(operation, set())
            self.leases[job_id] = lease
            try:
                await done.wait()
            finally:
                self.scheduler.release(lease, operation.model, completed=True)

        job = self.registry.submit(op, hold)
        self.finish.setdefault(job.id, asyncio.Event())
        return job

    def end(self, job: Job) -> None:
        self.finish[job.id].set()


def narrations(job: Job, action: str) -> list[dict[str, Any]]:
    found = [json.loads(data) for _, kind, data in job.events if kind == "narration"]
    return [n for n in found if n.get("action") == action]


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - it watches the scheduler's state, which has no event of its own
            await asyncio.sleep(0.01)


def make_queen(telemetry: Telemetry, hive: FakeHive, http: httpx.AsyncClient) -> Queen:
    scheduler = Scheduler(telemetry, http, spawn_timeout_s=10)
    registry = JobRegistry(actor="queen", hooks=[scheduler])
    return Queen(scheduler, hive, registry)


@pytest.fixture
async def gpu_queen() -> AsyncIterator[Queen]:
    """A hive with 64 GiB of RAM free and one 24 GiB GPU with 4 GiB free.

    On cuda:0: an idle worker of ``small`` (6 GiB, used 50 s ago) and a busy one of
    ``other`` (10 GiB); in RAM: an idle worker of ``small`` used longer ago and a busy one.
    """
    telemetry = Telemetry()
    needs = {"tiny": 3 * GiB, "small": 6 * GiB, "other": 10 * GiB, "big": 9 * GiB, "huge": 12 * GiB}
    needs["giant"] = 30 * GiB
    hive = FakeHive(telemetry, needs, gpus=[GpuMemory(index=0, name="GPU", total_bytes=24 * GiB, free_bytes=4 * GiB)])
    hive.add("w-gpu-idle", "small", "cuda:0", last_used_s_ago=50)
    hive.add("w-gpu-busy", "other", "cuda:0")
    hive.add("w-cpu-idle", "small", "cpu", last_used_s_ago=500)
    hive.add("w-cpu-busy", "other", "cpu")
    hive.beat()
    async with httpx.AsyncClient(transport=httpx.MockTransport(hive.handle)) as http:
        queen = make_queen(telemetry, hive, http)
        for worker_id in ("w-gpu-busy", "w-cpu-busy"):
            queen.scheduler.inflight[worker_id] = 1  # a job of its own in flight
        try:
            yield queen
        finally:
            await queen.registry.aclose()


def place(queen: Queen, model: str, device: str, waited_s: float = 0.0) -> str | _Evict | _Wait:
    return queen.scheduler._place(Infer(model=model, prompt="hi", device=device), [HIVE], waited_s, "job-x")


# -- VRAM ------------------------------------------------------------------------


async def test_a_worker_on_a_gpu_that_has_room_is_spawned_there(gpu_queen: Queen) -> None:
    assert place(gpu_queen, "tiny", "cuda:0") == HIVE  # 3 GiB needed, 4 GiB of VRAM free


async def test_an_idle_worker_on_the_same_gpu_is_evicted_for_its_estimate_not_one_in_ram(gpu_queen: Queen) -> None:
    # 9 GiB needed, 4 GiB free: stopping the idle cuda:0 worker frees its model's 6 GiB. The CPU
    # worker, idle for longer, frees no VRAM and stays.
    decision = place(gpu_queen, "big", "cuda:0")
    assert isinstance(decision, _Evict)
    assert (decision.worker.worker_id, decision.need, decision.free) == ("w-gpu-idle", 9 * GiB, 4 * GiB)


async def test_when_evicting_is_not_enough_the_job_waits_for_the_busy_workers_on_that_gpu(gpu_queen: Queen) -> None:
    # 12 GiB needed: 4 free + 6 from the idle worker is not enough; only the busy cuda:0 worker is waited for.
    decision = place(gpu_queen, "huge", "cuda:0")
    assert isinstance(decision, _Wait)
    assert (decision.need, decision.free, decision.busy) == (12 * GiB, 4 * GiB, ["w-gpu-busy"])


async def test_a_worker_larger_than_the_gpu_or_on_a_gpu_not_reported_is_refused_naming_it(gpu_queen: Queen) -> None:
    with pytest.raises(errors.NoWorkerAvailable) as larger:
        place(gpu_queen, "giant", "cuda:0")
    assert "GPU cuda:0" in larger.value.message and "at most 24.0 GiB" in larger.value.message
    with pytest.raises(errors.NoWorkerAvailable) as missing:
        place(gpu_queen, "tiny", "cuda:1")
    assert "GPU cuda:1" in missing.value.message and "reports GPUs cuda:0" in missing.value.message
    gpu_queen.hive.gpus = []
    gpu_queen.hive.beat()
    with pytest.raises(errors.NoWorkerAvailable) as none:
        place(gpu_queen, "tiny", "cuda:0")
    assert "GPU cuda:0" in none.value.message and "no GPU" in none.value.message


async def test_nothing_on_the_gpu_to_stop_or_wait_for_is_refused_at_once(gpu_queen: Queen) -> None:
    for worker_id in ("w-gpu-idle", "w-gpu-busy"):
        gpu_queen.hive.workers.pop(worker_id)
    gpu_queen.hive.beat()
    with pytest.raises(errors.NoWorkerAvailable) as refused:
        place(gpu_queen, "big", "cuda:0")
    assert "on GPU cuda:0, which has 4.0 GiB free" in refused.value.message


async def test_a_spawn_in_flight_on_the_gpu_holds_its_vram_and_not_ram(gpu_queen: Queen) -> None:
    scheduler = gpu_queen.scheduler
    loading = asyncio.Event()
    task = asyncio.get_running_loop().create_task(loading.wait(), name="test:spawn-in-flight")
    try:
        scheduler._reserved[task] = (HIVE, "cuda:0", 2 * GiB)  # type: ignore[assignment]
        # 3 GiB no longer fits in the 4 - 2 GiB left: the idle cuda:0 worker makes room.
        decision = place(gpu_queen, "tiny", "cuda:0")
        assert isinstance(decision, _Evict) and decision.free == 2 * GiB
        assert place(gpu_queen, "huge", "cpu") == HIVE  # RAM is untouched by it
    finally:
        loading.set()
        await task


async def test_cpu_workers_are_placed_by_ram_as_before(gpu_queen: Queen) -> None:
    assert place(gpu_queen, "huge", "cpu") == HIVE  # 64 GiB of RAM free; the GPU's 4 GiB is beside the point
    gpu_queen.hive.ram_available = 10 * GiB
    gpu_queen.hive.workers["w-cpu-idle"] = gpu_queen.hive.workers["w-cpu-idle"].model_copy(
        update={"memory_bytes": 5 * GiB}
    )
    gpu_queen.hive.beat()
    # In RAM, stopping a worker gives back its resident set; the least recently used idle one goes,
    # whatever its device.
    decision = place(gpu_queen, "huge", "cpu")
    assert isinstance(decision, _Evict) and decision.worker.worker_id == "w-cpu-idle"


async def test_an_infer_on_cuda_0_stops_the_idle_cuda_0_worker_then_spawns_there(gpu_queen: Queen) -> None:
    job = gpu_queen.infer("big", device="cuda:0")
    await until(lambda: job.id in gpu_queen.leases)
    lease = gpu_queen.leases[job.id]
    assert gpu_queen.hive.stopped == ["w-gpu-idle"]
    assert gpu_queen.hive.spawned == [("big", "cuda:0")]
    assert lease.worker.report.device == "cuda:0" and lease.worker.report.model == "big"
    (evict,) = narrations(job, "infer_evict")
    assert evict["need_bytes"] == 9 * GiB and evict["free_bytes"] == 4 * GiB
    assert "w-cpu-idle" in gpu_queen.hive.workers  # the CPU worker held no VRAM
    gpu_queen.end(job)
    await gpu_queen.registry.wait(job)
    assert job.status.value == "completed"


# -- groups: the drain after GROUP_WAIT_S -----------------------------------------


async def test_a_job_waiting_past_the_group_bound_drains_the_least_recently_used_busy_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scheduler_module, "GROUP_WAIT_S", 0.3)
    telemetry = Telemetry()
    # A limit that holds two workers of 100 MiB, and the room for a third once one is stopped.
    hive = FakeHive(telemetry, {"a": 100 * MiB, "b": 100 * MiB}, limit=250 * MiB)
    hive.add("wa-old", "a", last_used_s_ago=100)
    hive.add("wa-new", "a", last_used_s_ago=10)
    hive.beat()
    async with httpx.AsyncClient(transport=httpx.MockTransport(hive.handle)) as http:
        queen = make_queen(telemetry, hive, http)
        scheduler = queen.scheduler
        try:
            a1 = queen.infer("a", worker_id="wa-old")
            a2 = queen.infer("a", worker_id="wa-new")
            await until(lambda: {a1.id, a2.id} <= set(queen.leases))

            b = queen.infer("b")
            await until(lambda: bool(narrations(b, "infer_wait_memory")))
            assert scheduler._draining == {}  # within the bound, a busy model's group is served first
            await until(lambda: "wa-old" in scheduler._draining)
            assert scheduler._draining == {"wa-old": b.id}
            (drain,) = narrations(b, "infer_drain")
            assert drain["worker_id"] == "wa-old" and "no new jobs" in drain["human"]

            # Both workers have a free slot and the same load, and the draining one comes first
            # (it would get the job otherwise), but it takes no new job.
            a3 = queen.infer("a")
            await until(lambda: a3.id in queen.leases)
            assert queen.leases[a3.id].worker_id == "wa-new"
            await asyncio.sleep(0.3)
            assert hive.stopped == [] and hive.spawned == []  # its running job goes on

            queen.end(a1)  # its last job ends: it is stopped, and b's worker starts in its room
            await until(lambda: b.id in queen.leases)
            assert hive.stopped == ["wa-old"] and hive.spawned == [("b", "cpu")]
            assert queen.leases[b.id].worker.report.model == "b"
            assert "wa-old" not in scheduler._draining
            assert set(hive.workers) == {"wa-new", "w-b-0"}  # the other model-a worker still serves its jobs

            for job in (a2, a3, b):
                queen.end(job)
            for job in (a1, a2, a3, b):
                await queen.registry.wait(job)
                assert job.status.value == "completed", job.id
        finally:
            await queen.registry.aclose()

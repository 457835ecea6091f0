"""Scheduling ``infer`` jobs onto workers.

Among ready workers serving the model (and matching ``hive_id``, ``worker_id``
and ``device`` when given) the least loaded wins; ties go to the one idle
longest. When no worker serves the model, a hive that has it is asked to spawn
one. When every worker is busy the job waits in a bounded FIFO queue per
model, its stream showing its position and an estimated start (from the
durations of the model's recent jobs); past the bound, ``429``. A queued job
that is cancelled (DELETE, or its client gone with ``cancel_on_disconnect``)
leaves the queue at once.

A worker lost before the first token is retried once on another worker. A
greedy job (``temperature`` 0) whose worker is lost after its first token
goes on on another worker: the token ids behind the text already sent (the
``ids`` of its token events) are sent as ``resume_tokens``, the new worker puts
them after the prompt and generates what follows, and the client's stream
goes on with the next token index, no gap and no repeat (``infer_failover``;
``end.failovers`` lists each). A sampled job ends ``failed`` with
``worker_lost``: its continuation would not be the answer it was getting.
A worker that ends the job ``cancelled`` when nobody here cancelled it (it is
shutting down, e.g. because its hive died) is lost too.

Placement by memory. Before a hive is asked to start a worker, what the worker
needs (the hive's estimate in its heartbeat: the model file, the KV cache of the
slots and context it would get, the process) is compared with what the hive has
free: its available memory, capped by its ``--memory-limit`` minus what its
workers hold (each the larger of its resident set and its model's estimate) and
what spawns in flight have reserved. A worker that does not fit is never started.
Instead, in this order:

1. another hive that has the model and room starts it;
2. the least recently used idle worker on a hive where that makes room is stopped
   (``infer_evict``; never a worker with a job in flight), and the hive's next
   heartbeat is awaited before looking again;
3. the job waits (``infer_wait_memory``, saying what it needs and what is free),
   looking again whenever a job ends or a heartbeat arrives.

A model that can never fit (more than a hive's limit or total memory everywhere),
or that waits on a hive with no busy worker to wait for, fails ``no_worker`` at once.

A worker on a GPU (an ``infer`` whose ``device`` is ``cuda:N``) holds its weights
and KV cache in that GPU's memory, so there the same steps count VRAM instead:
the GPU's free memory as the hive reports it, less what spawns in flight on that
GPU set aside; only workers on that GPU are stopped (each freeing its model's
estimate) or waited for. A GPU the hive does not report, or one too small for the
worker, fails ``no_worker`` naming the GPU.

Groups. A worker whose model has jobs waiting (queued or just admitted) is not
stopped for another model, so jobs are served in groups per model rather than
swapping models on every request. The wait is bounded: a job that has waited
:data:`GROUP_WAIT_S` for memory may stop such workers too, and marks the least
recently used busy worker in its way as draining (it takes no new jobs, and is
stopped once its running jobs end). The jobs of the drained model then wait
their turn the same way, so two models sharing one machine alternate in groups
of at most about :data:`GROUP_WAIT_S` each.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx

from rbee import errors
from rbee.contracts.cluster import WorkerReport
from rbee.contracts.operations import Infer, WorkerSpawn, WorkerStop
from rbee.jobs.client import JobClient
from rbee.jobs.job import Job
from rbee.jobs.registry import JobHooks, current_job, emit_progress, set_end_fields
from rbee.jobs.timeline import Step
from rbee.narration import narrate
from rbee.queen.placements import Placement, Placements
from rbee.queen.relay import RemoteEnd, TokenTrail, raise_for_end, relay_job
from rbee.queen.telemetry import HiveView, Telemetry, WorkerView

__all__ = ["Scheduler", "Lease"]

_READY = ("ready", "busy")


#: Recent job durations kept per model for the queue's estimated start.
DURATIONS_KEPT = 32
#: How many times a greedy job may move to another worker after its first token.
MAX_FAILOVERS = 3
#: How long a POST waits for a worker to count a long prompt's tokens.
COUNT_TIMEOUT_S = 2.0
#: How long a job waits for memory before the workers of models with jobs of their own waiting
#: may be stopped (and drained) for it: the bound on serving one model's group first.
GROUP_WAIT_S = 15.0
#: How long an eviction waits for the hive's next heartbeat (its freed memory) before looking again.
EVICT_SETTLE_S = 5.0


def _mib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class _Evict:
    hive_id: str
    worker: WorkerView
    need: int
    free: int


@dataclass(frozen=True)
class _Pool:
    """The memory a new worker on one device of a hive would take: the machine's RAM, or one GPU's VRAM."""

    name: str  # "RAM", "GPU cuda:0"
    gpu: bool
    #: Free now, less what spawns in flight set aside.
    available: int
    #: Room under the hive's --memory-limit for what its workers hold (RAM only; None: no limit).
    limited: int | None
    #: The most one worker could ever have here.
    capacity: int
    #: The workers whose memory is in it: all of the hive's for RAM, those on the GPU for VRAM.
    workers: list[WorkerView]
    #: False for a GPU the hive does not report.
    reported: bool = True

    @property
    def free(self) -> int:
        return self.available if self.limited is None else min(self.available, self.limited)


def _pool_key(device: str) -> str:
    """Whose memory a worker on ``device`` holds: ``cuda:N`` its GPU's, anything else the machine's RAM."""
    return device if device.startswith("cuda:") else "ram"


@dataclass(frozen=True)
class _Wait:
    hive_id: str
    need: int
    free: int
    busy: list[str]


def input_bound(op: Infer) -> int:
    """At least as many tokens as ``op``'s input can have (a token is at least one byte)."""
    if op.messages is None:
        return len((op.prompt or "").encode()) + 8
    # The template's own text: role markers, turn separators, a default system prompt.
    return sum(len(m.content.encode()) + 16 for m in op.messages) + 256


@dataclass(eq=False)
class Lease:
    worker: WorkerView
    hive_id: str
    started: float = field(default_factory=time.monotonic)

    @property
    def worker_id(self) -> str:
        return self.worker.worker_id


class _Waiter:
    __slots__ = ("job_id", "seq")

    def __init__(self, job_id: str, seq: int) -> None:
        self.job_id = job_id
        self.seq = seq


class Scheduler(JobHooks):
    def __init__(
        self,
        telemetry: Telemetry,
        http: httpx.AsyncClient,
        *,
        token: str | None = None,
        queue_size: int = 64,
        spawn_timeout_s: float = 180.0,
        placements: Placements | None = None,
    ) -> None:
        self.telemetry = telemetry
        #: Where each job is, published as the scheduler decides (the web page reads it).
        self.placements = placements if placements is not None else Placements()
        self.http = http
        self.token = token
        self.queue_size = queue_size
        self.spawn_timeout_s = spawn_timeout_s
        self.inflight: dict[str, int] = {}
        self.idle_since: dict[str, float] = {}
        self.queues: dict[str, deque[_Waiter]] = {}
        self._spawns: dict[str, asyncio.Task[WorkerReport]] = {}
        self._seq = itertools.count()
        self._leases: set[Lease] = set()
        self._durations: dict[str, deque[float]] = {}
        # Jobs admitted for a model that hold no worker yet (queued, or about to be): the
        # queue bound counts them at POST time, so a burst of requests cannot slip past it.
        self._pending: dict[str, set[str]] = {}
        # Memory set aside for each spawn in flight: (hive_id, "ram" or its GPU, bytes).
        self._reserved: dict[asyncio.Task[WorkerReport], tuple[str, str, int]] = {}
        # Workers being stopped to make room, and workers draining for a job that waited long (-> its job id).
        self._evicting: set[str] = set()
        self._draining: dict[str, str] = {}

    # -- admission -------------------------------------------------------

    def admit(self, op: Infer) -> Awaitable[None] | None:
        """Refuse at POST time what can never run, or cannot be queued now.

        What needs a worker's answer (the prompt's tokens) is returned as an
        awaitable for the POST to wait on.
        """
        if op.hive_id is not None:
            hive = self.telemetry.hive(op.hive_id)  # 404 for an unknown hive
            if self.telemetry.state_of(hive) != "online":
                raise self.telemetry.offline(hive)
        if op.worker_id is not None and all(
            w.worker_id != op.worker_id for w in self.telemetry.workers(fresh_only=False)
        ):
            workers = ", ".join(sorted(w.worker_id for w in self.telemetry.workers(fresh_only=False))) or "none"
            raise errors.WorkerNotFound(
                f"worker_id: no worker {op.worker_id!r} is known to the queen (workers: {workers})",
                worker_id=op.worker_id,
            )
        contexts = [w.report.n_ctx for w in self.candidates(op, set(), fresh_only=False) if w.report.n_ctx]
        if contexts and all(op.max_tokens >= n for n in contexts):
            # The prompt is counted by the worker; max_tokens alone can already never fit.
            raise errors.InvalidOperation(
                f"max_tokens: {op.max_tokens} does not fit the context of any worker of {op.model}"
                f" (at most {max(contexts)} tokens, prompt included)",
                field="max_tokens",
                n_ctx=max(contexts),
            )
        waiting = len(self._pending.get(op.model, ()))
        if waiting >= self.queue_size and waiting >= self.queue_size + self._free_slots(op):
            raise errors.QueueFull(
                f"{waiting} jobs are already waiting for {op.model}; the queue holds {self.queue_size}",
                retry_after_s=2,
            )
        if not self.candidates(op, set(), fresh_only=False) and not self._spawn_hives(op):
            known = sorted({m.alias or m.id for h in self.telemetry.hives() for m in h.models})
            if any(h.has_model(op.model) for h in self.telemetry.hives()) or not self.telemetry.hives():
                raise errors.NoWorkerAvailable(f"no hive that has {op.model!r} is online")
            raise errors.ModelNotFound(
                f"no hive has a model {op.model!r} (models: {', '.join(known) or 'none'})", model=op.model
            )
        return self._context_check(op)

    def _context_check(self, op: Infer) -> Awaitable[None] | None:
        """The prompt plus ``max_tokens`` must fit some worker's context.

        A token covers at least one byte of its text, so a prompt whose bytes
        (with room for the special tokens and a chat template's own text) leave
        room for ``max_tokens`` always fits, and is not counted. Otherwise a
        worker of the model counts it (``POST /v1/tokens/count``); a worker that
        does not answer in time leaves the check to the worker that runs the job.
        """
        workers = [w for w in self.candidates(op, set()) if w.report.n_ctx and w.report.url]
        if not workers:
            return None
        best = max(workers, key=lambda w: w.report.n_ctx or 0)
        if input_bound(op) + op.max_tokens <= (best.report.n_ctx or 0):
            return None
        return self._count_and_check(op, best)

    async def _count_and_check(self, op: Infer, worker: WorkerView) -> None:
        token = worker.token or self.token
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        body = op.model_copy(update={"hive_id": None, "worker_id": None, "device": None}).model_dump_json()
        try:
            response = await self.http.post(
                f"{worker.report.url}/v1/tokens/count", content=body, headers=headers, timeout=COUNT_TIMEOUT_S
            )
        except httpx.HTTPError:
            return
        if response.status_code == 422:
            error = response.json().get("error") or {}
            raise errors.InvalidOperation(
                str(error.get("message") or "the worker refused the input"), field=error.get("field")
            )
        if response.status_code != 200:
            return
        counted = response.json()
        tokens_in, n_ctx = int(counted["tokens_in"]), int(counted["n_ctx"])
        if tokens_in + op.max_tokens > n_ctx:
            raise errors.InvalidOperation(
                f"max_tokens: the prompt is {tokens_in} tokens and max_tokens is {op.max_tokens}; "
                f"together they exceed the context of {n_ctx} tokens",
                field="max_tokens",
                tokens_in=tokens_in,
                n_ctx=n_ctx,
            )

    def _free_slots(self, op: Infer) -> int:
        return sum(
            max(0, max(1, w.report.slots) - self.inflight.get(w.worker_id, 0)) for w in self.candidates(op, set())
        )

    # -- job hooks -------------------------------------------------------

    def on_accepted(self, job: Job) -> None:
        """An admitted ``infer`` counts against its model's queue bound until it holds a worker."""
        op = job.operation
        if isinstance(op, Infer):
            self._pending.setdefault(op.model, set()).add(job.id)

    def on_finished(self, job: Job, end: dict[str, Any]) -> None:
        op = job.operation
        if isinstance(op, Infer):
            pending = self._pending.get(op.model)
            if pending is not None:
                pending.discard(job.id)
                if not pending:
                    del self._pending[op.model]

    def queue_depths(self) -> dict[str, int]:
        return {model: len(q) for model, q in self.queues.items() if q}

    # -- selection -------------------------------------------------------

    def candidates(self, op: Infer, excluded: set[str], *, fresh_only: bool = True) -> list[WorkerView]:
        found = []
        for w in self.telemetry.workers(fresh_only=fresh_only):
            r = w.report
            if r.state not in _READY or w.worker_id in excluded or not w.serves(op.model):
                continue
            if w.worker_id in self._draining or w.worker_id in self._evicting:
                continue
            if op.hive_id is not None and w.hive_id != op.hive_id:
                continue
            if op.worker_id is not None and w.worker_id != op.worker_id:
                continue
            if op.device is not None and r.device != op.device:
                continue
            found.append(w)
        return found

    def _spawn_hives(self, op: Infer) -> list[str]:
        hives = [h for h in self.telemetry.fresh_hives() if h.has_model(op.model)]
        if op.hive_id is not None:
            hives = [h for h in hives if h.hive_id == op.hive_id]
        if op.worker_id is not None:
            return []  # a named worker is never spawned
        # Hives running fewest workers first.
        hives.sort(key=lambda h: len(h.workers))
        return [h.hive_id for h in hives]

    def _free(self, w: WorkerView) -> bool:
        return self.inflight.get(w.worker_id, 0) < max(1, w.report.slots)

    async def acquire(self, op: Infer, excluded: set[str]) -> Lease:
        narrate("infer_schedule", f"Finding a worker for {op.model}", model=op.model)
        job = current_job()
        self.placements.step(job.id, Step.SCHEDULING)
        queue = self.queues.setdefault(op.model, deque())
        waiter: _Waiter | None = None
        last_position = -1
        memory_since: float | None = None  # when this job first found no room to start a worker
        told: tuple[str, tuple[str, ...]] | None = None
        try:
            while True:
                candidates = self.candidates(op, excluded)
                if candidates:
                    free = [w for w in candidates if self._free(w)]
                    first_in_line = (waiter is None and not queue) or (waiter is not None and queue[0] is waiter)
                    if free and first_in_line:
                        pick = min(
                            free,
                            key=lambda w: (self.inflight.get(w.worker_id, 0), self.idle_since.get(w.worker_id, 0.0)),
                        )
                        self.inflight[pick.worker_id] = self.inflight.get(pick.worker_id, 0) + 1
                        lease = Lease(pick, pick.hive_id)
                        self._leases.add(lease)
                        self._pending.get(op.model, set()).discard(job.id)
                        placement = Placement(job.id, pick.hive_id, pick.worker_id, attempt=len(excluded) + 1)
                        self.placements.placed(placement)
                        narrate(
                            "infer_worker",
                            f"Scheduled on worker {pick.worker_id} on hive {pick.hive_id} ({pick.report.url})",
                            **placement.fields(),
                        )
                        return lease
                    if waiter is None:
                        # An admitted job always gets its place (admission is the bound, counted at
                        # POST); only a retried one can find the queue full here.
                        admitted = job.id in self._pending.get(op.model, ())
                        if len(queue) >= self.queue_size and not admitted:
                            raise errors.QueueFull(f"the queue for {op.model} is full", retry_after_s=2)
                        waiter = _Waiter(job.id, next(self._seq))
                        queue.append(waiter)
                        self.placements.step(job.id, Step.QUEUED)
                        narrate("infer_queued", f"All workers for {op.model} are busy; waiting in the queue")
                    position = queue.index(waiter) + 1
                    if position != last_position:
                        eta_s = self.estimate_start_s(op.model, position, candidates)
                        emit_progress("queue", position, len(queue), "position", model=op.model, eta_s=eta_s)
                        last_position = position
                    await self.telemetry.changed(1.0)
                    continue
                hives = self._spawn_hives(op)
                if not hives:
                    raise errors.NoWorkerAvailable(
                        f"no ready worker serves {op.model!r} and no online hive can start one", model=op.model
                    )
                spawning = self._spawns.get(op.model)
                if spawning is not None and not spawning.done():
                    self.placements.step(job.id, Step.SPAWNING)
                    await self._ensure_spawn(op.model, hives[0], op.device or "cpu")
                    continue
                if memory_since is None:
                    memory_since = time.monotonic()
                decision = self._place(op, hives, time.monotonic() - memory_since, job.id)
                if isinstance(decision, str):
                    self.placements.step(job.id, Step.SPAWNING)
                    await self._ensure_spawn(op.model, decision, op.device or "cpu")
                elif isinstance(decision, _Evict):
                    await self._evict(decision, op.model)
                else:
                    said = (decision.hive_id, tuple(decision.busy))
                    if said != told:
                        told = said
                        busy = ", ".join(decision.busy) or "spawns in progress"
                        narrate(
                            "infer_wait_memory",
                            f"Waiting for memory: {op.model} needs {_mib(decision.need)} on hive {decision.hive_id},"
                            f" which has {_mib(max(0, decision.free))} free; waiting for {busy} to finish",
                            model=op.model,
                            hive_id=decision.hive_id,
                            need_bytes=decision.need,
                            free_bytes=decision.free,
                            busy_workers=decision.busy,
                        )
                    await self.telemetry.changed(1.0)
        finally:
            if waiter is not None:
                try:
                    queue.remove(waiter)
                except ValueError:
                    pass
                self.telemetry.notify()
            for worker_id in [w for w, claimant in self._draining.items() if claimant == job.id]:
                del self._draining[worker_id]

    def estimate_start_s(self, model: str, position: int, workers: list[WorkerView]) -> float | None:
        """Seconds until the job at ``position`` (1-based) in ``model``'s queue starts, or None if unknown.

        Each worker's slots free up when their running jobs reach the median
        duration of the model's recent jobs; the queue then fills them in order.
        """
        recent = self._durations.get(model)
        if not recent or not workers:
            return None
        typical = statistics.median(recent)
        now = time.monotonic()
        free_at: list[float] = []
        for w in workers:
            slots = max(1, w.report.slots)
            running = sorted(now - lease.started for lease in self._leases if lease.worker_id == w.worker_id)
            free_at += [max(0.0, typical - elapsed) for elapsed in running[:slots]]
            free_at += [0.0] * max(0, slots - len(running))
        heapq.heapify(free_at)
        start = 0.0
        for _ in range(position):
            start = heapq.heappop(free_at)
            heapq.heappush(free_at, start + typical)
        return round(start, 1)

    def release(
        self, lease: Lease, model: str | None = None, completed: bool = False, keep_alive: float | None = None
    ) -> None:
        self._leases.discard(lease)
        if completed and model is not None:
            self._durations.setdefault(model, deque(maxlen=DURATIONS_KEPT)).append(time.monotonic() - lease.started)
        n = self.inflight.get(lease.worker_id, 1) - 1
        if n <= 0:
            self.inflight.pop(lease.worker_id, None)
            self.idle_since[lease.worker_id] = time.monotonic()
            self._idle_now(lease, keep_alive)
        else:
            self.inflight[lease.worker_id] = n
        self.telemetry.notify()

    def _idle_now(self, lease: Lease, keep_alive: float | None) -> None:
        """Show the worker idle with the job's keep-alive at once (its hive's next heartbeat says the same)."""
        hive = next((h for h in self.telemetry.hives() if h.hive_id == lease.hive_id), None)
        view = hive.workers.get(lease.worker_id) if hive is not None else None
        if view is None:
            return
        keep = view.report.keep_alive_s if keep_alive is None else keep_alive
        now = time.time()
        unloads_at = None if keep is None or keep < 0 else now + keep
        view.report = view.report.model_copy(update={"keep_alive_s": keep, "idle_since": now, "unloads_at": unloads_at})

    # -- memory ----------------------------------------------------------

    def _need(self, hive: HiveView, model: str) -> int | None:
        """What a worker of ``model`` needs on ``hive`` (its estimate), None when it does not say."""
        report = hive.model(model)
        return report.worker_memory_bytes if report is not None else None

    def _held(self, hive: HiveView, worker: WorkerView) -> int:
        need = self._need(hive, worker.report.model) or 0
        return max(worker.report.memory_bytes or 0, need)

    def _pool(self, hive: HiveView, device: str) -> _Pool | None:
        """The memory a new worker on ``device`` would take on ``hive``; None when the hive reports none.

        On ``cuda:N`` that is GPU N's free VRAM; else the machine's available RAM, and room under the
        hive's limit for what its workers hold. Either way less what spawns in flight there set aside.
        """
        memory = hive.memory
        if memory is None:
            return None
        key = _pool_key(device)
        reserved = sum(n for t, (h, k, n) in self._reserved.items() if (h, k) == (hive.hive_id, key) and not t.done())
        if key != "ram":
            workers = [w for w in hive.workers.values() if w.report.device == device]
            gpu = next((g for g in memory.gpus if g.index == int(key.removeprefix("cuda:"))), None)
            if gpu is None:
                return _Pool(f"GPU {device}", True, 0, None, 0, workers, reported=False)
            return _Pool(f"GPU {device}", True, gpu.free_bytes - reserved, None, gpu.total_bytes, workers)
        workers = list(hive.workers.values())
        limit, capacity, limited = memory.limit_bytes, memory.total_bytes, None
        if limit is not None:
            limited = limit - sum(self._held(hive, w) for w in workers) - reserved
            capacity = min(limit, capacity)
        return _Pool("RAM", False, memory.available_bytes - reserved, limited, capacity, workers)

    def _last_used(self, worker: WorkerView) -> float:
        """Wall-clock time the worker last finished a job here (else became idle, else started)."""
        used = self.idle_since.get(worker.worker_id)
        if used is not None:
            return time.time() - (time.monotonic() - used)
        return worker.report.idle_since or worker.report.started_at or 0.0

    def _wanted(self, worker: WorkerView) -> bool:
        """Jobs for the worker's model are waiting (queued or admitted): its group is not served yet."""
        return any(jobs and worker.serves(model) for model, jobs in self._pending.items())

    def _idle(self, worker: WorkerView) -> bool:
        r = worker.report
        return (
            r.state == "ready"
            and not self.inflight.get(worker.worker_id)
            and not r.busy_slots
            and not r.queue
            and worker.worker_id not in self._evicting
        )

    def _place(self, op: Infer, hives: list[str], waited_s: float, job_id: str) -> str | _Evict | _Wait:
        """Where a worker of ``op.model`` starts: a hive (spawn there), a worker to stop first, or a wait."""
        device = op.device or "cpu"
        views = [self.telemetry.hive(h) for h in hives]
        pools = {hive.hive_id: self._pool(hive, device) for hive in views}
        for hive in views:
            need, pool = self._need(hive, op.model), pools[hive.hive_id]
            if need is None or pool is None or need <= pool.free:
                return hive.hive_id
        patient = waited_s >= GROUP_WAIT_S
        possible: list[tuple[HiveView, int, _Pool]] = []
        for hive in views:
            need, pool = self._need(hive, op.model), pools[hive.hive_id]
            assert need is not None and pool is not None
            if need > pool.capacity:
                continue
            possible.append((hive, need, pool))
            idle = [w for w in pool.workers if self._idle(w) and (patient or not self._wanted(w))]
            idle.sort(key=self._last_used)
            available, limited = pool.available, pool.limited
            for w in idle:
                if pool.gpu:
                    # Its weights and KV cache leave the GPU: what its hive estimates a worker of its model holds.
                    available += self._need(hive, w.report.model) or 0
                else:
                    # Its resident set goes back to the machine and its share back to the limit.
                    available += w.report.memory_bytes or 0
                    if limited is not None:
                        limited += self._held(hive, w)
                if (available if limited is None else min(available, limited)) >= need:
                    return _Evict(hive.hive_id, idle[0], need, pool.free)
        if not possible:
            raise self._never_fits(op.model, device, [(h, p) for h in views if (p := pools[h.hive_id]) is not None])
        for hive, need, pool in possible:
            busy = [w for w in pool.workers if not self._idle(w) and w.report.state != "stopping"]
            key = (hive.hive_id, _pool_key(device))
            spawns = any((h, k) == key and not t.done() for t, (h, k, _) in self._reserved.items())
            if busy or spawns or any(self._idle(w) for w in pool.workers):
                if patient:
                    self._drain(hive, busy, job_id)
                return _Wait(hive.hive_id, need, pool.free, sorted(w.worker_id for w in busy))
        hive, need, pool = possible[0]
        where = f" on {pool.name}" if pool.gpu else ""
        raise errors.NoWorkerAvailable(
            f"{op.model} needs {_mib(need)} on hive {hive.hive_id}{where}, which has {_mib(max(0, pool.free))} free"
            " and no worker to stop or wait for",
            model=op.model,
        )

    def _never_fits(self, model: str, device: str, pools: list[tuple[HiveView, _Pool]]) -> errors.NoWorkerAvailable:
        """The error for a worker that no hive could hold even with nothing else on it."""
        best, pool = max(pools, key=lambda hp: hp[1].capacity)
        if not pool.reported:
            gpus = ", ".join(f"cuda:{g.index}" for g in best.memory.gpus) if best.memory is not None else ""
            return errors.NoWorkerAvailable(
                f"{model} is to run on GPU {device}, which no hive that has the model reports"
                f" (hive {best.hive_id} reports {'GPUs ' + gpus if gpus else 'no GPU'})",
                model=model,
                device=device,
            )
        where = f" on {pool.name}" if pool.gpu else ""
        return errors.NoWorkerAvailable(
            f"{model} needs {_mib(self._need(best, model) or 0)} for a worker{where}, more than any hive"
            f" that has it can give (hive {best.hive_id}: at most {_mib(pool.capacity)})",
            model=model,
        )

    def _drain(self, hive: HiveView, busy: list[WorkerView], job_id: str) -> None:
        """After the group bound: the least recently used busy worker takes no new jobs, so it can be stopped."""
        if any(self._draining.get(w.worker_id) == job_id for w in busy):
            return
        candidates = [w for w in busy if w.worker_id not in self._draining]
        if not candidates:
            return
        pick = min(candidates, key=self._last_used)
        self._draining[pick.worker_id] = job_id
        narrate(
            "infer_drain",
            f"Worker {pick.worker_id} ({pick.report.model}) on hive {hive.hive_id} takes no new jobs,"
            " so it can be stopped once its running jobs end",
            worker_id=pick.worker_id,
            hive_id=hive.hive_id,
        )

    async def _evict(self, evict: _Evict, model: str) -> None:
        """Stop an idle worker to make room for ``model``; then wait for the hive's next heartbeat."""
        worker = evict.worker
        worker_id = worker.worker_id
        idle_s = max(0.0, time.time() - self._last_used(worker))
        narrate(
            "infer_evict",
            f"Stopping idle worker {worker_id} ({worker.report.model}, idle for {idle_s:.0f} s) on hive"
            f" {evict.hive_id}: {model} needs {_mib(evict.need)} and {_mib(max(0, evict.free))} is free",
            worker_id=worker_id,
            hive_id=evict.hive_id,
            evicted_model=worker.report.model,
            need_bytes=evict.need,
            free_bytes=evict.free,
        )
        self._evicting.add(worker_id)
        hive = self.telemetry.hive(evict.hive_id)
        before = hive.heartbeats
        try:
            client = JobClient(hive.url, token=self.token, client=self.http)
            op = WorkerStop(hive_id=evict.hive_id, worker_id=worker_id)
            async with asyncio.timeout(self.spawn_timeout_s):
                end = await relay_job(client, op, where=f"hive {evict.hive_id}", results=False)
            if (end.get("error") or {}).get("kind") not in (None, "worker_not_found"):
                raise_for_end(end, f"hive {evict.hive_id}")
        except (errors.RbeeError, TimeoutError) as exc:
            # Gone already (its keep-alive ran out), or its hive did not answer: look again.
            narrate("infer_evict_failed", f"Could not stop worker {worker_id}: {exc}", level="warn")
        except Exception as exc:  # e.g. the hive refused the stop: it is gone already
            narrate("infer_evict_failed", f"Could not stop worker {worker_id}: {exc}", level="warn")
        finally:
            self._evicting.discard(worker_id)
            self._draining.pop(worker_id, None)
        self.telemetry.drop_worker(evict.hive_id, worker_id)
        deadline = time.monotonic() + EVICT_SETTLE_S
        while time.monotonic() < deadline:
            current = self.telemetry.hives()
            if not any(h.hive_id == evict.hive_id and h.heartbeats > before for h in current):
                await self.telemetry.changed(deadline - time.monotonic())
                continue
            break

    # -- spawning --------------------------------------------------------

    async def _ensure_spawn(self, model: str, hive_id: str, device: str) -> WorkerReport:
        task = self._spawns.get(model)
        if task is None or task.done():
            narrate("infer_spawn", f"No worker serves {model}; asking hive {hive_id} to start one", hive_id=hive_id)
            task = asyncio.get_running_loop().create_task(
                self._spawn(model, hive_id, device), name=f"spawn:{model}@{hive_id}"
            )
            self._spawns[model] = task
            need = self._need(self.telemetry.hive(hive_id), model)
            if need is not None:
                self._reserved[task] = (hive_id, _pool_key(device), need)

            def spawned(t: asyncio.Task[WorkerReport]) -> None:
                self._reserved.pop(t, None)
                if self._spawns.get(model) is t:
                    self._spawns.pop(model, None)
                self.telemetry.notify()

            task.add_done_callback(spawned)
        else:
            narrate("infer_spawn_wait", f"Waiting for the worker being started for {model}")
        return await asyncio.shield(task)

    async def _spawn(self, model: str, hive_id: str, device: str) -> WorkerReport:
        hive = self.telemetry.hive(hive_id)
        client = JobClient(hive.url, token=self.token, client=self.http)
        op = WorkerSpawn(hive_id=hive_id, model=model, device=device)
        started = time.monotonic()
        async with asyncio.timeout(self.spawn_timeout_s):
            end = await relay_job(client, op, where=f"hive {hive_id}", results=False)
        raise_for_end(end, f"hive {hive_id}")
        worker = end.get("worker") or {}
        report = WorkerReport.model_validate(worker)
        token = end.get("worker_token")
        self.telemetry.put_worker(hive_id, report, token if isinstance(token, str) else None)
        load_s = time.monotonic() - started
        narrate(
            "infer_spawned",
            f"Worker {report.worker_id} is ready at {report.url}; loading {model} took {load_s:.1f} s",
            worker_id=report.worker_id,
            load_ms=round(load_s * 1000, 1),
        )
        return report

    # -- running ---------------------------------------------------------

    async def infer(self, op: Infer) -> None:
        job = current_job()
        narrate("infer_start", f"Starting inference with {op.model}", model=op.model, prompt_chars=op.input_chars)
        excluded: set[str] = set()
        retried = False
        # Greedy output is a function of the tokens so far, so it can be carried over.
        trail = TokenTrail(op.resume_tokens) if op.temperature <= 0 else None
        failovers: list[dict[str, Any]] = []
        run = op
        lost: errors.WorkerLost | None = None
        while True:
            try:
                lease = await self.acquire(run, excluded)
            except errors.RbeeError as exc:
                if lost is None:
                    raise
                # Nobody can take the job over: it ends as what happened to it.
                raise errors.WorkerLost(
                    f"{lost.message}; no other worker could take the job over: {exc.message}"
                ) from None
            completed = False
            try:
                await self._run_on(lease, run, trail)
                completed = True
                return
            except errors.WorkerLost as exc:
                excluded.add(lease.worker_id)
                self.telemetry.drop_worker(lease.hive_id, lease.worker_id)
                if job.tokens and trail is not None and trail.complete and len(failovers) < MAX_FAILOVERS:
                    failovers.append({"worker_id": lease.worker_id, "after_tokens": len(trail.ids)})
                    set_end_fields(failovers=failovers)
                    if len(trail.ids) >= op.max_tokens:
                        # Every token was sent; only the worker's end was lost.
                        set_end_fields(tokens_out=len(trail.ids), stop_reason="max_tokens")
                        completed = True
                        return
                    narrate(
                        "infer_failover",
                        f"Worker {lease.worker_id} was lost after {job.tokens} tokens ({exc.message});"
                        f" the greedy answer goes on on another worker from its {len(trail.ids)} token ids",
                        level="warn",
                        worker_id=lease.worker_id,
                        tokens_sent=job.tokens,
                        tokens_resumed=len(trail.ids),
                    )
                    run = op.model_copy(update={"resume_tokens": list(trail.ids)})
                    lost = exc
                    continue
                if job.tokens == 0 and not retried:
                    retried = True
                    self.placements.step(job.id, Step.RETRYING)
                    narrate(
                        "infer_retry",
                        f"Worker {lease.worker_id} was lost before the first token ({exc.message});"
                        " retrying once on another worker",
                        level="warn",
                        worker_id=lease.worker_id,
                    )
                    continue
                raise
            finally:
                self.release(lease, op.model, completed, op.keep_alive)

    async def _relay_watched(self, lease: Lease, relay: Coroutine[Any, Any, RemoteEnd]) -> RemoteEnd:
        """``relay`` raced against its hive's heartbeats: when the hive has gone stale and
        the stream has brought nothing for a heartbeat interval, the worker is taken for lost
        (a machine that vanished sends no reset; its stream would only end at the client's
        silence bound)."""
        job = current_job()
        relaying = asyncio.create_task(relay, name=f"queen:relay:{job.id}")
        watching = asyncio.create_task(self._hive_gone(lease, job), name=f"queen:hive-watch:{job.id}")
        try:
            await asyncio.wait({relaying, watching}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            relaying.cancel()
            watching.cancel()
            await asyncio.gather(relaying, watching, return_exceptions=True)
            raise
        if relaying.done():
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            return relaying.result()
        relaying.cancel()  # the relay cancels the remote job on its way out (bounded)
        await asyncio.gather(relaying, return_exceptions=True)
        lost = watching.exception()
        raise lost if lost is not None else errors.WorkerLost(f"worker {lease.worker_id}'s hive went away")

    async def _hive_gone(self, lease: Lease, job: Any) -> None:
        """Returns (raising :class:`WorkerLost`) once ``lease``'s hive is stale and ``job`` quiet."""
        interval = self.telemetry.interval_s
        seen = len(job.events)
        while True:
            await asyncio.sleep(interval)
            try:
                hive = self.telemetry.hive(lease.hive_id)
            except errors.HiveNotFound:
                hive = None
            quiet = len(job.events) == seen
            seen = len(job.events)
            if quiet and (hive is None or self.telemetry.state_of(hive) != "online"):
                age = f"{hive.age_s():.0f} s" if hive is not None else "a while"
                raise errors.WorkerLost(
                    f"hive {lease.hive_id} has sent no heartbeat for {age} and worker {lease.worker_id}'s stream"
                    f" has been silent for {interval:g} s: its machine is taken for gone"
                )

    async def _run_on(self, lease: Lease, op: Infer, trail: TokenTrail | None = None) -> None:
        job = current_job()
        url = lease.worker.report.url
        if not url:
            raise errors.WorkerLost(f"worker {lease.worker_id} has no address")
        # The worker's own token, from its hive; a worker without one shares the cluster's.
        client = JobClient(url, token=lease.worker.token or self.token, client=self.http)
        update: dict[str, Any] = {"hive_id": None, "worker_id": None, "device": None}
        if job.timeout_s is not None:
            remaining = job.timeout_s - job.elapsed_ms() / 1000.0
            update["timeout_s"] = max(0.001, remaining)
        worker_op = op.model_copy(update=update)
        self.placements.step(job.id, Step.DISPATCHED)
        narrate("infer_dispatch", f"Sending the prompt to worker {lease.worker_id}", worker_id=lease.worker_id)
        started = time.perf_counter()
        end = await self._relay_watched(
            lease, relay_job(client, worker_op, where=f"worker {lease.worker_id}", lost=errors.WorkerLost, trail=trail)
        )
        fields: dict[str, Any] = {
            k: end[k]
            for k in (
                "tokens_in",
                "tokens_out",
                "stop_reason",
                "stop_sequence",
                "ttft_ms",
                "tokens_per_s",
                "decode_ms",
                "tokens_reused",
            )
            if k in end
        }
        fields["worker_ttft_ms"] = fields.pop("ttft_ms", None)
        set_end_fields(worker_id=lease.worker_id, hive_id=lease.hive_id, **fields)
        set_end_fields(worker_wall_ms=round((time.perf_counter() - started) * 1000, 3))
        if end.get("status") == "cancelled":
            # Nobody here cancelled it (that would have cancelled this task): the worker is going away.
            reason = (end.get("error") or {}).get("message") or "no reason given"
            raise errors.WorkerLost(f"worker {lease.worker_id} stopped the job ({reason})")
        raise_for_end(end, f"worker {lease.worker_id}")

"""The workers of a hive: spawn one per model, watch it, stop it, leave none behind.

:class:`Supervisor` owns this hive's workers and one watcher task per worker,
which awaits the process's exit: a worker that dies is marked ``dead`` and
forgotten at once, and the hive tells the queen without waiting for the next
heartbeat. The process itself (start, readiness, signals) is
:mod:`rbee.hive.processes`; its address, :mod:`rbee.hive.addresses`; the pid
records a restarted hive reaps orphans from, :mod:`rbee.hive.pidfiles`.

A hive with a token gives each worker a token of its own (the queen learns it
from the heartbeat), so the hive's token never reaches a worker process.

Keep-alive: each worker says (``/v1/ready``) when it became idle and how long it
wants to be kept (its last job's ``keep_alive``, else the hive's default, given
as ``--keep-alive``). :meth:`Supervisor.run_keepalive` polls the workers every
heartbeat interval (sooner when one is due) and stops the one idle past its
time (``worker_unload``); -1 keeps it for ever.

Memory: with ``memory_limit_bytes`` the hive's workers may hold that much in
all; each holds the larger of its measured resident set and what the hive
reckoned it needs when it started it (:func:`rbee.hive.capacity.worker_bytes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

from rbee.errors import WorkerNotFound
from rbee.hive import processes
from rbee.hive.addresses import listen_socket, reachable_host, url_host
from rbee.hive.capacity import (
    DEFAULT_N_CTX,
    MAX_SLOTS,
    SlotPlan,
    model_kv_bytes_per_token,
    plan_slots,
    slots_that_fit,
    worker_bytes,
)
from rbee.hive.catalog import ModelEntry
from rbee.hive.pidfiles import PidRecords
from rbee.hive.processes import POLL_INTERVAL_S, STOP_GRACE_S, WORKER_COMMAND, describe_exit, log_tail
from rbee.hive.workers import WorkerProcess, int_arg
from rbee.narration import narrate

# WorkerProcess is what a Supervisor hands out, so it is importable from here too.
__all__ = ["Supervisor", "WorkerProcess"]


class Supervisor:
    """Spawns, tracks and stops this hive's workers. Owns one watcher task per worker."""

    def __init__(
        self,
        *,
        home: Path,
        http: httpx.AsyncClient,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        token: str | None = None,
        engine: str = "llama",
        extra_args: Sequence[str] = (),
        ready_timeout_s: float = 120.0,
        stop_grace_s: float = STOP_GRACE_S,
        on_change: Callable[[], None] | None = None,
        command: Sequence[str] = WORKER_COMMAND,
        state_dir: Path | None = None,
        keep_alive_s: float = 300.0,
        memory_limit_bytes: int | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        self.home = home
        self.log_dir = home / "logs"
        self.http = http
        self.host = host
        self.advertise_host = advertise_host or reachable_host(host)
        self.token = token
        self.engine = engine
        self.extra_args = tuple(extra_args)
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self.on_change = on_change
        self.command = tuple(command)
        self.workers: dict[str, WorkerProcess] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        #: Where each running worker's pid record lives (None: not recorded).
        self.state_dir = state_dir
        self.pids = PidRecords(state_dir)
        #: How long a worker stays once idle, unless its last job said otherwise (-1: for ever).
        self.keep_alive_s = keep_alive_s
        #: A cap on what this hive's workers may hold in all (None: the machine's memory).
        self.memory_limit_bytes = memory_limit_bytes
        #: The hive's certificate and key, which its workers serve too (None: plain HTTP), so the
        #: queen reaches every one of them pinned to the fingerprint in the hive's heartbeat.
        self.tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
        self.scheme = "https" if self.tls is not None else "http"

    # -- looking up -----------------------------------------------------------

    def get(self, worker_id: str) -> WorkerProcess:
        worker = self.workers.get(worker_id)
        if worker is None:
            known = ", ".join(sorted(self.workers)) or "none"
            raise WorkerNotFound(
                f"no worker {worker_id!r} was spawned by this hive (workers: {known})", worker_id=worker_id
            )
        return worker

    def all(self) -> list[WorkerProcess]:
        return list(self.workers.values())

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def readdress(self, host: str) -> None:
        """The machine's address changed: workers (bound with the hive, to every address)
        are reached at ``host`` from now on, the running ones too."""
        self.advertise_host = host
        for worker in self.workers.values():
            port = urlsplit(worker.url).port
            worker.url = f"{self.scheme}://{url_host(host)}:{port}"

    # -- memory ---------------------------------------------------------------

    def held_bytes(self) -> int:
        """What this hive's workers hold: each the larger of its resident set and its reservation."""
        return sum(max(w.memory_bytes or 0, w.reserved_bytes or 0) for w in self.workers.values() if w.state != "dead")

    def free_bytes(self) -> int:
        """Memory a new worker may take: what the machine has available, capped by the limit minus what workers hold."""
        available = int(psutil.virtual_memory().available)
        if self.memory_limit_bytes is None:
            return available
        return max(0, min(available, self.memory_limit_bytes - self.held_bytes()))

    def plan(self, model: ModelEntry) -> SlotPlan:
        """The slots and context a worker of ``model`` would get now."""
        return plan_slots(
            model.path,
            n_ctx=int_arg(self.extra_args, "--n-ctx", DEFAULT_N_CTX),
            slots=int_arg(self.extra_args, "--slots"),
            available=self.free_bytes() if self.memory_limit_bytes is not None else None,
        )

    def worker_bytes(self, model: ModelEntry, plan: SlotPlan | None = None) -> int:
        """What a worker of ``model`` needs here: the file, the KV cache of its slots, the process.

        Without a ``plan`` the slots are planned as :meth:`plan` would, from the model's KV
        size per token read once per file (this runs for every model in every heartbeat).
        """
        per_token = model_kv_bytes_per_token(model.path)
        n_ctx = plan.n_ctx if plan is not None else int_arg(self.extra_args, "--n-ctx", DEFAULT_N_CTX) or DEFAULT_N_CTX
        per_slot = per_token * n_ctx if per_token is not None else None
        if plan is not None:
            slots = plan.slots
        else:
            slots = int_arg(self.extra_args, "--slots") or 0
            if not slots:
                free = self.free_bytes() if self.memory_limit_bytes is not None else psutil.virtual_memory().available
                fit = slots_that_fit(model.size_bytes, per_slot, free) if per_slot else 1
                slots = max(1, min(MAX_SLOTS, fit))
        return worker_bytes(model.size_bytes, per_slot, slots)

    # -- spawning -------------------------------------------------------------

    async def spawn(self, model: ModelEntry, *, device: str = "cpu", aliases: Sequence[str] = ()) -> WorkerProcess:
        """Start a worker for ``model`` and return once it says it is ready."""
        worker_id = f"worker-{secrets.token_hex(4)}"
        names = list(dict.fromkeys(a for a in aliases if a and a != model.id))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{worker_id}.log"
        narrate(
            "worker_spawn_start",
            f"Starting worker {worker_id} for {model.id} on {device} ({self.engine} engine)",
            actor="hive",
            worker_id=worker_id,
            model=model.id,
            device=device,
        )
        plan = self.plan(model)
        narrate(
            "worker_slots",
            f"Worker {worker_id} gets {plan.reason}",
            actor="hive",
            worker_id=worker_id,
            slots=plan.slots,
            n_ctx=plan.n_ctx,
            kv_bytes_per_slot=plan.kv_bytes_per_slot,
        )
        sock = listen_socket(self.host)
        try:
            url = f"{self.scheme}://{url_host(self.advertise_host)}:{sock.getsockname()[1]}"
            argv = [
                *self.command,
                "--model",
                model.path,
                "--worker-id",
                worker_id,
                "--model-id",
                model.id,
                *[arg for name in names for arg in ("--alias", name)],
                "--fd",
                str(sock.fileno()),
                "--host",
                self.host,
                "--device",
                device,
                "--engine",
                self.engine,
                "--slots",
                str(plan.slots),
                "--n-ctx",
                str(plan.n_ctx),
                "--keep-alive",
                f"{self.keep_alive_s:g}",
                *processes.tls_args(self.tls),
                *self.extra_args,  # last: a --slots here wins
            ]
            token = secrets.token_urlsafe(24) if self.token else None
            proc = await processes.start(argv, log_path, fd=sock.fileno(), home=self.home, token=token)
        finally:
            # The child holds its own copy; ours would keep the port open after the worker dies.
            sock.close()
        worker = WorkerProcess(worker_id, model.id, names, device, url, log_path, proc, token=token)
        worker.slots = plan.slots
        worker.reserved_bytes = self.worker_bytes(model, plan)
        self.workers[worker_id] = worker
        self.pids.write(worker)
        watcher = asyncio.get_running_loop().create_task(
            self._watch(worker), name=f"hive:watch:{worker_id}", context=contextvars.Context()
        )
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        narrate(
            "worker_process",
            f"Worker {worker_id} is process {worker.pid}, listening at {url} (log: {log_path})",
            actor="hive",
            worker_id=worker_id,
            pid=worker.pid,
            url=url,
            log_file=str(log_path),
        )
        processes.progress(1, 3)
        self._changed()
        try:
            await processes.wait_ready(
                self.http, worker, timeout_s=self.ready_timeout_s, token=worker.token or self.token
            )
        except BaseException:
            await asyncio.shield(self._terminate(worker))
            raise
        self._changed()
        return worker

    async def _probe(self, worker: WorkerProcess, timeout_s: float) -> dict[str, Any] | None:
        """The worker's ``/v1/ready`` answer (with its own token, else the hive's), or None."""
        return await processes.probe(self.http, worker, timeout_s, token=worker.token or self.token)

    # -- watching -------------------------------------------------------------

    async def _watch(self, worker: WorkerProcess) -> None:
        code = await worker.proc.wait()
        expected = worker.state == "stopping"
        worker.exit_code = code
        worker.state = "dead"
        worker.exited.set()
        self.workers.pop(worker.worker_id, None)
        self.pids.remove(worker.worker_id)
        if not expected:
            last = log_tail(worker.log_path, 1)
            narrate(
                "worker_exited",
                f"Worker {worker.worker_id} (pid {worker.pid}) {describe_exit(code)}"
                + (f"; last log line: {last}" if last else ""),
                level="warn",
                actor="hive",
                worker_id=worker.worker_id,
                exit_code=code,
                log_file=str(worker.log_path),
            )
        self._changed()

    async def refresh(self, timeout_s: float = 1.0) -> None:
        """Ask every running worker how busy it is, all at once."""
        targets = [w for w in self.workers.values() if w.state in ("ready", "busy")]
        if not targets:
            return
        answers = await asyncio.gather(*(self._probe(w, timeout_s) for w in targets))
        for worker, ready in zip(targets, answers, strict=True):
            if ready is not None and worker.state in ("ready", "busy"):
                worker.apply(ready)
            worker.measure()

    # -- keep-alive -----------------------------------------------------------

    async def run_keepalive(self, interval_s: float) -> None:
        """Stop each worker idle past its keep-alive; checks every ``interval_s`` and when one is due.

        A task the hive app owns. The workers are asked afresh right before, so
        one that took a job meanwhile is kept.
        """
        while True:
            try:
                await self.refresh(min(1.0, interval_s))
                now = time.time()
                for worker in [w for w in self.all() if w.idle and w.unloads_at is not None and w.unloads_at <= now]:
                    await self._unload(worker)
            except Exception as exc:  # a bug here must not end keep-alive for good
                narrate("keepalive_failed", f"Keep-alive check failed: {exc!r}", level="error", actor="hive")
            due = [w.unloads_at for w in self.all() if w.idle and w.unloads_at is not None]
            wait = interval_s if not due else min(interval_s, max(POLL_INTERVAL_S, min(due) - time.time()))
            await asyncio.sleep(wait)

    async def _unload(self, worker: WorkerProcess) -> None:
        idle_s = time.time() - (worker.idle_since or time.time())
        keep = worker.keep_alive_s or 0.0
        narrate(
            "worker_unload",
            f"Worker {worker.worker_id} of {worker.model_id} was idle for {idle_s:.1f} s"
            f" (keep-alive {keep:g} s); stopping it to free its memory",
            actor="hive",
            worker_id=worker.worker_id,
            model=worker.model_id,
            idle_s=round(idle_s, 3),
            keep_alive_s=keep,
        )
        await self._stop_if_there(worker.worker_id)

    async def stop_all(self, model: str | None = None) -> list[WorkerProcess]:
        """Stop every worker (of ``model`` when given: its id or one of its names), in parallel."""
        chosen = [w for w in self.all() if model is None or model == w.model_id or model in w.aliases]
        await asyncio.gather(*(self._stop_if_there(w.worker_id) for w in chosen))
        return chosen

    async def _stop_if_there(self, worker_id: str) -> None:
        with contextlib.suppress(WorkerNotFound):  # it exited meanwhile
            await self.stop(worker_id)

    # -- pid records ----------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        """The pid records in the state directory (this run's and any left by an earlier one)."""
        return self.pids.read()

    async def reap_orphans(self) -> list[str]:
        """Stop the workers an earlier run of this hive left running; returns their ids."""
        return await self.pids.reap(self.workers, self.stop_grace_s)

    # -- stopping -------------------------------------------------------------

    async def stop(self, worker_id: str) -> WorkerProcess:
        """Stop a worker this hive spawned: SIGTERM, a grace period (5 s), then SIGKILL."""
        worker = self.get(worker_id)
        narrate(
            "worker_stop",
            f"Stopping worker {worker_id} (pid {worker.pid})",
            actor="hive",
            worker_id=worker_id,
            pid=worker.pid,
        )
        await self._terminate(worker)
        narrate(
            "worker_stopped",
            f"Worker {worker_id} stopped ({describe_exit(worker.exit_code)})",
            actor="hive",
            worker_id=worker_id,
            exit_code=worker.exit_code,
        )
        return worker

    async def _terminate(self, worker: WorkerProcess) -> None:
        if worker.exited.is_set():
            return
        if worker.state != "stopping":
            worker.state = "stopping"
            self._changed()
        await processes.terminate(worker, self.stop_grace_s)

    async def aclose(self) -> None:
        """Stop every worker (in parallel), then the watchers."""
        workers = self.all()
        if workers:
            await asyncio.gather(*(self._terminate(w) for w in workers), return_exceptions=True)
        for task in list(self._watchers):
            task.cancel()
        if self._watchers:
            await asyncio.gather(*self._watchers, return_exceptions=True)

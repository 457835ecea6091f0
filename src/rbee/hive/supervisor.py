"""Worker processes: spawn one per model, watch it, stop it, leave none behind.

The hive binds each worker's listening socket itself (on its own host, port 0)
and hands the descriptor to the child, so the worker's address is known before
the process starts and is reachable wherever the hive is. One watcher task per
worker awaits the process's exit: a worker that dies is marked ``dead`` and
forgotten at once, and the hive tells the queen without waiting for the next
heartbeat.

Workers run in their own session (a Ctrl-C meant for the hive does not reach
them directly; the hive stops them in order) and, on Linux, receive SIGTERM if
the hive itself dies without stopping them.

Each worker's pid is recorded in the hive's state directory while it runs. A
hive that starts after a previous run died (``kill -9``, a power cut of the
process, a worker that ignored its SIGTERM) finds the records and stops every
worker still running from that run, so none is left orphaned
(:meth:`Supervisor.reap_orphans`).

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
import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

from rbee.contracts.cluster import WorkerReport
from rbee.errors import WorkerFailed, WorkerNotFound
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
from rbee.jobs.registry import emit_progress
from rbee.narration import current_job, narrate

__all__ = ["Supervisor", "WorkerProcess", "WORKER_COMMAND", "listen_socket", "reachable_host", "url_host"]

#: How a worker process is started; the hive appends the worker's own flags.
WORKER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "rbee.worker.main")

POLL_INTERVAL_S = 0.05
STOP_GRACE_S = 5.0
LOG_TAIL_LINES = 20

_WILDCARDS = ("", "0.0.0.0", "::")
# The worker's /v1/ready state -> the worker state the hive reports.
_STATES = {"idle": "ready", "busy": "busy", "loading": "starting", "error": "dead"}


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def reachable_host(bind_host: str, toward: str | None = None) -> str:
    """The address others use to reach a socket bound to ``bind_host``.

    A wildcard bind is reachable at the address of the interface that routes
    toward ``toward`` (the queen), else at the host name's address.
    """
    if bind_host not in _WILDCARDS:
        return bind_host
    target = urlsplit(toward).hostname if toward else None
    if target:
        family = socket.AF_INET6 if ":" in target else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((target, 9))  # a UDP connect only picks a route; nothing is sent
                return str(probe.getsockname()[0])
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def listen_socket(host: str, port: int = 0) -> socket.socket:
    """A listening TCP socket on ``host`` (port 0: any free port)."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        if port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16_384))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


if sys.platform == "linux":
    import ctypes

    # Resolved now: the child runs this between fork and exec, where only
    # already-bound calls are safe.
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _PR_SET_PDEATHSIG = 1
    _SIGTERM = int(signal.SIGTERM)

    def _die_with_parent() -> None:
        _prctl(_PR_SET_PDEATHSIG, _SIGTERM, 0, 0, 0)

    _PREEXEC: Callable[[], None] | None = _die_with_parent
else:  # pragma: no cover - the hive stops its workers itself there
    _PREEXEC = None


@dataclass
class WorkerProcess:
    """One worker this hive spawned."""

    worker_id: str
    model_id: str
    aliases: list[str]
    device: str
    url: str
    log_path: Path
    proc: asyncio.subprocess.Process
    started_at: float = field(default_factory=time.time)
    state: str = "starting"  # starting | ready | busy | stopping | dead
    slots: int = 1
    busy_slots: int = 0
    queue: int = 0
    n_ctx: int | None = None
    current_job: str | None = None
    exit_code: int | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    #: The worker's own bearer token (None: the hive has none, nor has the worker).
    token: str | None = field(default=None, repr=False)
    #: Keep-alive, as the worker last said (``/v1/ready``).
    keep_alive_s: float | None = None
    idle_since: float | None = None
    unloads_at: float | None = None
    #: Resident set of the process, measured at the last refresh.
    memory_bytes: int | None = None
    #: What the hive reckoned the worker needs when it started it (file, KV, process).
    reserved_bytes: int | None = None

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def report(self) -> WorkerReport:
        return WorkerReport(
            worker_id=self.worker_id,
            model=self.model_id,
            model_aliases=list(self.aliases),
            device=self.device,
            state=self.state,
            url=self.url,
            pid=self.pid,
            slots=self.slots,
            busy_slots=self.busy_slots,
            queue=self.queue,
            n_ctx=self.n_ctx,
            started_at=self.started_at,
            current_job=self.current_job,
            keep_alive_s=self.keep_alive_s,
            idle_since=self.idle_since,
            unloads_at=self.unloads_at,
            memory_bytes=self.memory_bytes,
        )

    @property
    def idle(self) -> bool:
        return self.state == "ready" and self.busy_slots == 0 and self.queue == 0 and self.current_job is None

    def measure(self) -> None:
        """Take the process's resident set now (psutil)."""
        try:
            self.memory_bytes = int(psutil.Process(self.pid).memory_info().rss)
        except (psutil.Error, OSError):
            pass

    def describe(self) -> dict[str, Any]:
        """A report plus what an operator needs to look further (the log file)."""
        return {**self.report().model_dump(), "log_file": str(self.log_path)}

    def apply(self, ready: dict[str, Any]) -> None:
        """Take in what the worker's ``/v1/ready`` says."""
        state = ready.get("state")
        if ready.get("ready") and state not in ("busy", "error"):
            self.state = "ready"
        elif isinstance(state, str) and state in _STATES:
            self.state = _STATES[state]
        for name in ("slots", "busy_slots", "queue", "n_ctx"):
            value = ready.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, value)
        job = ready.get("current_job")
        self.current_job = job if isinstance(job, str) else None
        for name in ("keep_alive_s", "idle_since", "unloads_at"):
            value = ready.get(name)
            number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
            setattr(self, name, None if number is None else float(number))


def _int_arg(args: Sequence[str], name: str, default: int | None = None) -> int | None:
    """The value of ``name`` in worker arguments (``--name=N`` or ``--name N``; the last one wins)."""
    value = default
    for i, arg in enumerate(args):
        text = arg.partition("=")[2] if arg.startswith(name + "=") else None
        if arg == name and i + 1 < len(args):
            text = args[i + 1]
        if text is not None and text.isdigit():
            value = int(text)
    return value


def _progress(done: int, total: int) -> None:
    if current_job() is not None:
        emit_progress("worker_start", done, total, "steps")


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
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        #: Where each running worker's pid record lives (None: not recorded).
        self.state_dir = state_dir
        #: How long a worker stays once idle, unless its last job said otherwise (-1: for ever).
        self.keep_alive_s = keep_alive_s
        #: A cap on what this hive's workers may hold in all (None: the machine's memory).
        self.memory_limit_bytes = memory_limit_bytes

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
            n_ctx=_int_arg(self.extra_args, "--n-ctx", DEFAULT_N_CTX),
            slots=_int_arg(self.extra_args, "--slots"),
            available=self.free_bytes() if self.memory_limit_bytes is not None else None,
        )

    def worker_bytes(self, model: ModelEntry, plan: SlotPlan | None = None) -> int:
        """What a worker of ``model`` needs here: the file, the KV cache of its slots, the process.

        Without a ``plan`` the slots are planned as :meth:`plan` would, from the model's KV
        size per token read once per file (this runs for every model in every heartbeat).
        """
        per_token = model_kv_bytes_per_token(model.path)
        n_ctx = plan.n_ctx if plan is not None else _int_arg(self.extra_args, "--n-ctx", DEFAULT_N_CTX) or DEFAULT_N_CTX
        per_slot = per_token * n_ctx if per_token is not None else None
        if plan is not None:
            slots = plan.slots
        else:
            slots = _int_arg(self.extra_args, "--slots") or 0
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
            url = f"http://{url_host(self.advertise_host)}:{sock.getsockname()[1]}"
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
                *self.extra_args,  # last: a --slots here wins
            ]
            token = secrets.token_urlsafe(24) if self.token else None
            proc = await self._start_process(argv, log_path, sock.fileno(), token)
        finally:
            # The child holds its own copy; ours would keep the port open after the worker dies.
            sock.close()
        worker = WorkerProcess(worker_id, model.id, names, device, url, log_path, proc, token=token)
        worker.slots = plan.slots
        worker.reserved_bytes = self.worker_bytes(model, plan)
        self.workers[worker_id] = worker
        self._record(worker)
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
        _progress(1, 3)
        self._changed()
        try:
            await self._wait_ready(worker)
        except BaseException:
            await asyncio.shield(self._terminate(worker))
            raise
        self._changed()
        return worker

    async def _start_process(
        self, argv: list[str], log_path: Path, fd: int, token: str | None = None
    ) -> asyncio.subprocess.Process:
        env = dict(os.environ)
        env["RBEE_HOME"] = str(self.home)
        env["PYTHONUNBUFFERED"] = "1"
        if token:
            env["RBEE_TOKEN"] = token  # the environment, not argv: other users can read argv
        else:
            env.pop("RBEE_TOKEN", None)
        with log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} rbee-hive starts: {' '.join(argv)}\n".encode())
            log.flush()
            try:
                return await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    pass_fds=(fd,),
                    env=env,
                    start_new_session=True,
                    preexec_fn=_PREEXEC,
                )
            except OSError as exc:
                raise WorkerFailed(f"cannot start the worker process {argv[0]}: {exc.strerror or exc}") from None

    async def _wait_ready(self, worker: WorkerProcess) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        deadline = t0 + self.ready_timeout_s
        loading_seen = False
        while True:
            if worker.exited.is_set():
                raise WorkerFailed(
                    f"worker {worker.worker_id} {_describe_exit(worker.exit_code)} before it was ready; "
                    f"the last lines of {worker.log_path}:\n{_tail(worker.log_path)}",
                    worker_id=worker.worker_id,
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise WorkerFailed(
                    f"worker {worker.worker_id} was not ready within {self.ready_timeout_s:g} s; "
                    f"the last lines of {worker.log_path}:\n{_tail(worker.log_path)}",
                    worker_id=worker.worker_id,
                )
            ready = await self._probe_unless_exit(worker, min(1.0, remaining))
            if ready is None:
                await asyncio.sleep(POLL_INTERVAL_S)
                continue
            if ready.get("state") == "error":
                detail = ready.get("error") or ready.get("message") or "no detail"
                raise WorkerFailed(
                    f"worker {worker.worker_id} failed while loading {worker.model_id}: {detail}",
                    worker_id=worker.worker_id,
                )
            if ready.get("ready"):
                worker.apply(ready)
                if worker.state == "starting":
                    worker.state = "ready"
                _progress(3, 3)
                narrate(
                    "worker_ready",
                    f"Worker {worker.worker_id} is ready at {worker.url} after {loop.time() - t0:.1f} s",
                    actor="hive",
                    worker_id=worker.worker_id,
                    url=worker.url,
                    startup_ms=round((loop.time() - t0) * 1000, 1),
                )
                return
            if not loading_seen:
                loading_seen = True
                _progress(2, 3)
                narrate(
                    "worker_loading",
                    f"Worker {worker.worker_id} is loading {worker.model_id}",
                    actor="hive",
                    worker_id=worker.worker_id,
                )
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _probe(self, worker: WorkerProcess, timeout_s: float) -> dict[str, Any] | None:
        """The worker's ``/v1/ready`` answer, or None when it does not answer (yet)."""
        try:
            headers = {"Authorization": f"Bearer {worker.token}"} if worker.token else self._headers
            response = await self.http.get(f"{worker.url}/v1/ready", headers=headers, timeout=timeout_s)
        except (httpx.HTTPError, OSError):
            return None
        if response.status_code != 200:
            return None
        try:
            data = response.json()
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    async def _probe_unless_exit(self, worker: WorkerProcess, timeout_s: float) -> dict[str, Any] | None:
        # The socket is listening before the worker runs, so a probe can sit in
        # the backlog; racing it against the exit notices a crash at once.
        probe = asyncio.ensure_future(self._probe(worker, timeout_s))
        exit_wait = asyncio.ensure_future(worker.exited.wait())
        try:
            await asyncio.wait({probe, exit_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (probe, exit_wait):
                task.cancel()
            await asyncio.gather(probe, exit_wait, return_exceptions=True)
        if probe.cancelled() or probe.exception() is not None:
            return None
        return probe.result()

    # -- watching -------------------------------------------------------------

    async def _watch(self, worker: WorkerProcess) -> None:
        code = await worker.proc.wait()
        expected = worker.state == "stopping"
        worker.exit_code = code
        worker.state = "dead"
        worker.exited.set()
        self.workers.pop(worker.worker_id, None)
        self._unrecord(worker.worker_id)
        if not expected:
            last = _tail(worker.log_path, 1)
            narrate(
                "worker_exited",
                f"Worker {worker.worker_id} (pid {worker.pid}) {_describe_exit(code)}"
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

    def _record(self, worker: WorkerProcess) -> None:
        if self.state_dir is None:
            return
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            record = {
                "worker_id": worker.worker_id,
                "pid": worker.pid,
                "create_time": _create_time(worker.pid),
                "hive_pid": os.getpid(),
                "hive_create_time": _create_time(os.getpid()),
                "model": worker.model_id,
                "url": worker.url,
                "started_at": worker.started_at,
            }
            path = self.state_dir / f"{worker.worker_id}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(path)
        except OSError as exc:
            narrate("worker_record_failed", f"Cannot record worker {worker.worker_id}: {exc}", level="warn")

    def _unrecord(self, worker_id: str) -> None:
        if self.state_dir is not None:
            _unlink(self.state_dir / f"{worker_id}.json")

    def records(self) -> list[dict[str, Any]]:
        """The pid records in the state directory (this run's and any left by an earlier one)."""
        if self.state_dir is None or not self.state_dir.is_dir():
            return []
        found = []
        for path in sorted(self.state_dir.glob("worker-*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                record = {}
            if not isinstance(record, dict):
                record = {}
            record["_path"] = str(path)
            found.append(record)
        return found

    async def reap_orphans(self) -> list[str]:
        """Stop the workers an earlier run of this hive left running; returns their ids.

        A record counts only if its process is the one recorded (same pid and
        start time, so a reused pid is never touched) and the hive that
        recorded it is gone. Records of processes that have ended are removed.
        """
        reaped = []
        for record in self.records():
            path = Path(record.pop("_path"))
            worker_id = str(record.get("worker_id", path.stem))
            if worker_id in self.workers:
                continue  # this run's own worker
            owner = _same_process(record.get("hive_pid"), record.get("hive_create_time"))
            if owner is not None and owner.pid != os.getpid():
                continue  # another hive process, still alive, owns it
            orphan = _same_process(record.get("pid"), record.get("create_time"))
            if orphan is not None:
                narrate(
                    "worker_orphan",
                    f"Worker {worker_id} (pid {orphan.pid}) of an earlier run of this hive is still running;"
                    " stopping it",
                    level="warn",
                    actor="hive",
                    worker_id=worker_id,
                    pid=orphan.pid,
                )
                await _stop_process(orphan, self.stop_grace_s)
                reaped.append(worker_id)
            _unlink(path)
        return reaped

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
            f"Worker {worker_id} stopped ({_describe_exit(worker.exit_code)})",
            actor="hive",
            worker_id=worker_id,
            exit_code=worker.exit_code,
        )
        return worker

    def _signal(self, worker: WorkerProcess, sig: int) -> None:
        if worker.proc.returncode is not None:
            return
        try:
            # The worker leads its own process group: anything it started goes too.
            os.killpg(worker.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                worker.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    async def _terminate(self, worker: WorkerProcess) -> None:
        grace_s = self.stop_grace_s
        if worker.exited.is_set():
            return
        if worker.state != "stopping":
            worker.state = "stopping"
            self._changed()
        self._signal(worker, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace_s):
                await worker.exited.wait()
            return
        except TimeoutError:
            pass
        narrate(
            "worker_kill",
            f"Worker {worker.worker_id} did not stop within {grace_s:g} s; killing it",
            level="warn",
            actor="hive",
            worker_id=worker.worker_id,
        )
        self._signal(worker, signal.SIGKILL)
        try:
            async with asyncio.timeout(grace_s):
                await worker.exited.wait()
        except TimeoutError:
            pass

    async def aclose(self) -> None:
        """Stop every worker (in parallel), then the watchers."""
        workers = self.all()
        if workers:
            await asyncio.gather(*(self._terminate(w) for w in workers), return_exceptions=True)
        for task in list(self._watchers):
            task.cancel()
        if self._watchers:
            await asyncio.gather(*self._watchers, return_exceptions=True)


def _create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


def _same_process(pid: Any, create_time: Any) -> psutil.Process | None:
    """The live process ``pid`` if it started at ``create_time`` (so it is the one recorded)."""
    if not isinstance(pid, int) or not isinstance(create_time, (int, float)) or pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except (psutil.Error, OSError):
        return None
    return proc


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


async def _stop_process(proc: psutil.Process, grace_s: float) -> None:
    """SIGTERM (and SIGCONT, in case it is stopped) to its process group, then SIGKILL after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
    if await _wait_gone(proc, grace_s):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    await _wait_gone(proc, grace_s)


async def _wait_gone(proc: psutil.Process, timeout_s: float) -> bool:
    # Not our child, so there is no exit to await: poll, bounded.
    for _ in range(max(1, int(timeout_s / POLL_INTERVAL_S))):
        if _gone(proc):
            return True
        await asyncio.sleep(POLL_INTERVAL_S)
    return _gone(proc)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()

"""The hive's executor: worker and model operations, each run as a job.

The hive takes only :data:`~rbee.contracts.HIVE_OPERATIONS`; anything else
(``infer`` included: that goes to a worker) is refused at ``POST`` time with
``422``, and an unknown model or worker with ``404``, before a job exists.
So is what can be refused without the network: a malformed download source
(``422``), a model name already taken or a model a worker still uses (``409``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import platform
from collections.abc import Awaitable, Callable
from pathlib import Path

from rbee import __version__, errors
from rbee.contracts.operations import (
    HIVE_OPERATIONS,
    HiveCheck,
    ModelDelete,
    ModelDownload,
    ModelGet,
    ModelList,
    OperationBase,
    WorkerGet,
    WorkerList,
    WorkerSpawn,
    WorkerStop,
    WorkerStopAll,
)
from rbee.hive.capacity import DEFAULT_N_CTX
from rbee.hive.catalog import ModelCatalog, ModelEntry
from rbee.hive.download import Downloader
from rbee.hive.heartbeat import DeviceProbe
from rbee.hive.processes import WORKER_COMMAND
from rbee.hive.supervisor import Supervisor
from rbee.hive.workers import int_arg
from rbee.jobs.registry import emit_progress, emit_result, set_end_fields
from rbee.narration import narrate

__all__ = ["HiveRouter"]


class HiveRouter:
    def __init__(
        self,
        *,
        hive_id: str,
        catalog: ModelCatalog,
        supervisor: Supervisor,
        devices: DeviceProbe | None = None,
        downloads: Downloader | None = None,
        models_dir: Path | None = None,
        catalog_changed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.hive_id = hive_id
        self.catalog = catalog
        self.supervisor = supervisor
        self.devices = devices or DeviceProbe()
        self.downloads = downloads
        self.models_dir = models_dir
        self.catalog_changed = catalog_changed

    async def admit(self, op: OperationBase) -> None:
        """Checks done at POST time, before a job exists."""
        if op.name not in HIVE_OPERATIONS:
            raise errors.UnsupportedOperation(
                f"a hive does not run {op.name!r}; it takes: {', '.join(sorted(HIVE_OPERATIONS))}"
            )
        named = getattr(op, "hive_id", None)
        if "hive_id" in op.model_fields_set and named != self.hive_id:
            # Addressed to another hive: running it here would act on the wrong machine.
            raise errors.HiveNotFound(f"this is hive {self.hive_id!r}, not {named!r}", hive_id=named)
        if isinstance(op, WorkerSpawn):
            self._refuse_over_limit(await self.catalog.resolve(op.model))
        elif isinstance(op, ModelGet):
            await self.catalog.resolve(op.model)
        elif isinstance(op, WorkerGet | WorkerStop):
            self.supervisor.get(op.worker_id)
        elif isinstance(op, WorkerStopAll) and op.model is not None:
            self._known_model(op.model)
        elif isinstance(op, ModelDownload):
            await self.catalog.ready()
            self._downloader().plan(op)
        elif isinstance(op, ModelDelete):
            model = await self.catalog.resolve(op.model)
            self.catalog.check_removable(model)
            self._refuse_in_use(model)

    async def __call__(self, op: OperationBase) -> None:
        narrate("hive_route", f"Hive {self.hive_id} executing {op.name}", operation=op.name)
        if isinstance(op, WorkerSpawn):
            await self.worker_spawn(op)
        elif isinstance(op, WorkerList):
            await self.worker_list()
        elif isinstance(op, WorkerGet):
            await self.worker_get(op)
        elif isinstance(op, WorkerStop):
            await self.worker_stop(op)
        elif isinstance(op, WorkerStopAll):
            await self.worker_stop_all(op)
        elif isinstance(op, ModelList):
            await self.model_list()
        elif isinstance(op, ModelGet):
            await self.model_get(op)
        elif isinstance(op, ModelDownload):
            await self.model_download(op)
        elif isinstance(op, ModelDelete):
            await self.model_delete(op)
        elif isinstance(op, HiveCheck):
            await self.hive_check()
        else:
            raise errors.UnsupportedOperation(f"the hive has no handler for {op.name!r}")

    # -- workers --------------------------------------------------------------

    async def worker_spawn(self, op: WorkerSpawn) -> None:
        model = await self.catalog.resolve(op.model)
        narrate(
            "model_resolved",
            f"Model {op.model!r} is {model.id} ({model.quantization or 'unknown quantization'}, "
            f"{model.size_bytes / 1e6:.0f} MB) at {model.path}",
            model=model.id,
            file=model.path,
        )
        # The caller's name for the model is one the worker answers to as well.
        aliases = [a for a in (model.alias, op.model) if a]
        worker = await self.supervisor.spawn(model, device=op.device, aliases=aliases)
        report = worker.report().model_dump()
        emit_result({"worker": report})
        set_end_fields(worker=report)
        if worker.token:
            # For the queen, which relays results but never a hive's end event to its clients.
            set_end_fields(worker_token=worker.token)

    async def worker_list(self) -> None:
        await self.supervisor.refresh()  # busy or idle as of now, not of the last heartbeat
        workers = [{"hive_id": self.hive_id, **w.describe()} for w in self.supervisor.all()]
        narrate("worker_list", f"{len(workers)} worker(s) on hive {self.hive_id}", workers=len(workers))
        emit_result({"workers": workers})

    async def worker_get(self, op: WorkerGet) -> None:
        worker = self.supervisor.get(op.worker_id)
        await self.supervisor.refresh()
        narrate("worker_get", f"Worker {worker.worker_id} is {worker.state} at {worker.url}", worker_id=op.worker_id)
        emit_result({"worker": {"hive_id": self.hive_id, **worker.describe()}})

    async def worker_stop(self, op: WorkerStop) -> None:
        await self.supervisor.stop(op.worker_id)
        emit_result({"worker_id": op.worker_id, "stopped": True})

    def _refuse_over_limit(self, model: ModelEntry) -> None:
        """With ``--memory-limit``, a worker that would take the hive's workers past it is refused (409)."""
        limit = self.supervisor.memory_limit_bytes
        if limit is None:
            return
        need, held = self.supervisor.worker_bytes(model), self.supervisor.held_bytes()
        if need > limit - held:
            mib = 2**20
            raise errors.JobConflict(
                f"model: a worker of {model.alias or model.id} needs {need / mib:.0f} MiB; hive {self.hive_id}'s"
                f" workers may hold {limit / mib:.0f} MiB (--memory-limit) and hold {held / mib:.0f} MiB;"
                " stop one first (rbee ps, rbee stop MODEL)",
                model=model.id,
                need_bytes=need,
                held_bytes=held,
            )

    def _known_model(self, ref: str) -> None:
        serving = any(ref == w.model_id or ref in w.aliases for w in self.supervisor.all())
        if not serving and self.catalog.find(ref) is None:
            known = sorted({name for m in self.catalog.models_now() for name in m.names()})
            raise errors.ModelNotFound(
                f"model: hive {self.hive_id} has no model {ref!r} (models: {', '.join(known) or 'none'})",
                model=ref,
                field="model",
            )

    async def worker_stop_all(self, op: WorkerStopAll) -> None:
        what = f"of {op.model} " if op.model else ""
        stopped = await self.supervisor.stop_all(op.model)
        narrate(
            "worker_stop_all",
            f"Stopped {len(stopped)} worker(s) {what}on hive {self.hive_id}",
            stopped=len(stopped),
            model=op.model,
        )
        rows = [{"hive_id": self.hive_id, "worker_id": w.worker_id, "model": w.model_id} for w in stopped]
        emit_result({"hive_id": self.hive_id, "stopped": rows})
        set_end_fields(stopped=rows)  # for the queen, which gathers them from every hive

    # -- models ---------------------------------------------------------------

    async def model_list(self) -> None:
        models = [m.to_dict() for m in await self.catalog.models()]
        narrate("model_list", f"{len(models)} model(s) on hive {self.hive_id}", models=len(models))
        emit_result({"models": models})

    async def model_get(self, op: ModelGet) -> None:
        model = await self.catalog.resolve(op.model)
        narrate("model_get", f"Model {model.id}: {model.architecture}, {model.quantization}", model=model.id)
        # The model may be trained for more: a worker here runs each slot with this context.
        worker_n_ctx = int_arg(self.supervisor.extra_args, "--n-ctx", DEFAULT_N_CTX)
        emit_result({"model": {**model.to_dict(), "worker_n_ctx": worker_n_ctx}})

    def _downloader(self) -> Downloader:
        if self.downloads is None:
            raise errors.UnsupportedOperation(f"hive {self.hive_id} has no models directory to download into")
        return self.downloads

    def _refuse_in_use(self, model: ModelEntry) -> None:
        users = [w for w in self.supervisor.all() if w.model_id == model.id and w.state != "dead"]
        if users:
            ids = ", ".join(w.worker_id for w in users)
            first = users[0].worker_id
            raise errors.JobConflict(
                f"model {model.alias or model.id} is in use by worker(s) {ids} on hive {self.hive_id}; "
                f"stop them first (rbee worker stop {first} --hive {self.hive_id})",
                model=model.id,
                workers=[w.worker_id for w in users],
            )

    async def model_download(self, op: ModelDownload) -> None:
        entry = await self._downloader().run(op)
        emit_result({"model": entry.to_dict()})
        set_end_fields(model=entry.id, alias=entry.alias, hive_id=self.hive_id)
        await self._catalog_changed()

    async def model_delete(self, op: ModelDelete) -> None:
        model = await self.catalog.resolve(op.model)
        self._refuse_in_use(model)  # a worker may have started since POST
        owned = self.models_dir if self.models_dir is not None else Path(model.path).parent / ".none"
        entry, file_deleted = self.catalog.delete(op.model, owned=owned)
        where = f"; deleted {entry.path}" if file_deleted else f"; its file stays at {entry.path}"
        narrate("model_deleted", f"Removed {entry.alias or entry.id} from hive {self.hive_id}{where}", model=entry.id)
        emit_result({"model": entry.id, "alias": entry.alias, "deleted": True, "file_deleted": file_deleted})
        await self._catalog_changed()

    async def _catalog_changed(self) -> None:
        if self.catalog_changed is not None:
            await self.catalog_changed()

    # -- self-check -----------------------------------------------------------

    async def hive_check(self) -> None:
        """A self-test: narration through every path, then what this hive can do."""
        narrate("check_start", f"Hive {self.hive_id} self-check: narration, progress, catalog, devices, workers")
        narrate("check_direct", "Narration from the executor itself")
        await _check_nested(0)
        async with asyncio.TaskGroup() as tg:
            for n in range(3):
                tg.create_task(_check_spawned(n), name=f"hive_check:{n}")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: None)  # the thread bridge leaves context intact
        emit_progress("check_progress", 1, 4, "steps")

        models = await self.catalog.models()
        if models:
            narrate("check_catalog", f"Catalog: {len(models)} model(s): {', '.join(m.alias or m.id for m in models)}")
        else:
            narrate("check_catalog", "Catalog: no models", level="warn")
        emit_progress("check_progress", 2, 4, "steps")

        devices = await self.devices.all()
        names = ", ".join(f"{d['id']} ({d.get('name') or d['kind']})" for d in devices)
        narrate("check_devices", f"Devices: {names}", devices=len(devices))
        emit_progress("check_progress", 3, 4, "steps")

        worker_module = WORKER_COMMAND[-1]
        worker_available = self.supervisor.command != WORKER_COMMAND or _importable(worker_module)
        if worker_available:
            narrate("check_worker", f"Worker program: {' '.join(self.supervisor.command)} ({self.supervisor.engine})")
        else:
            narrate("check_worker", f"The worker program {worker_module} cannot be imported", level="warn")
        workers = self.supervisor.all()
        narrate("check_workers", f"{len(workers)} worker(s) running", workers=len(workers))
        emit_progress("check_progress", 4, 4, "steps")
        narrate("check_levels", "A warning-level narration (expected)", level="warn")
        emit_result(
            {
                "hive": "ok",
                "hive_id": self.hive_id,
                "version": __version__,
                "python": platform.python_version(),
                "pid": os.getpid(),
                "models": len(models),
                "workers": len(workers),
                "devices": devices,
                "worker_engine": self.supervisor.engine,
                "worker_available": worker_available,
                "paths": ["direct", "nested", "spawned_tasks", "thread", "progress", "result"],
            }
        )
        narrate("check_complete", f"Hive {self.hive_id} self-check passed")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


async def _check_nested(depth: int) -> None:
    narrate("check_nested", f"Narration from a nested call (depth {depth})", depth=depth)
    if depth < 2:
        await _check_nested(depth + 1)


async def _check_spawned(n: int) -> None:
    await asyncio.sleep(0.01 * n)
    narrate("check_task", f"Narration from spawned task {n}", task=n)

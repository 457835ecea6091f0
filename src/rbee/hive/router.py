"""The hive's executor: worker and model operations, each run as a job.

The hive takes only :data:`~rbee.contracts.HIVE_OPERATIONS`; anything else
(``infer`` included: that goes to a worker) is refused at ``POST`` time with
``422``, and an unknown model or worker with ``404``, before a job exists.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import platform

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
)
from rbee.hive.catalog import ModelCatalog
from rbee.hive.heartbeat import DeviceProbe
from rbee.hive.supervisor import WORKER_COMMAND, Supervisor
from rbee.jobs.registry import emit_progress, emit_result, set_end_fields
from rbee.narration import narrate

__all__ = ["HiveRouter"]

_NOT_YET = (ModelDownload, ModelDelete)


class HiveRouter:
    def __init__(
        self,
        *,
        hive_id: str,
        catalog: ModelCatalog,
        supervisor: Supervisor,
        devices: DeviceProbe | None = None,
    ) -> None:
        self.hive_id = hive_id
        self.catalog = catalog
        self.supervisor = supervisor
        self.devices = devices or DeviceProbe()

    async def admit(self, op: OperationBase) -> None:
        """Checks done at POST time, before a job exists."""
        if op.name not in HIVE_OPERATIONS:
            raise errors.UnsupportedOperation(
                f"a hive does not run {op.name!r}; it takes: {', '.join(sorted(HIVE_OPERATIONS))}"
            )
        if isinstance(op, _NOT_YET):
            raise errors.UnsupportedOperation(f"{op.name} is not available yet on this hive")
        if isinstance(op, WorkerSpawn | ModelGet):
            await self.catalog.resolve(op.model)
        elif isinstance(op, WorkerGet | WorkerStop):
            self.supervisor.get(op.worker_id)

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
        elif isinstance(op, ModelList):
            await self.model_list()
        elif isinstance(op, ModelGet):
            await self.model_get(op)
        elif isinstance(op, HiveCheck):
            await self.hive_check()
        elif isinstance(op, _NOT_YET):
            raise errors.UnsupportedOperation(f"{op.name} is not available yet on this hive")
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

    async def worker_list(self) -> None:
        await self.supervisor.refresh()  # busy or idle as of now, not of the last heartbeat
        workers = [w.describe() for w in self.supervisor.all()]
        narrate("worker_list", f"{len(workers)} worker(s) on hive {self.hive_id}", workers=len(workers))
        emit_result({"workers": workers})

    async def worker_get(self, op: WorkerGet) -> None:
        worker = self.supervisor.get(op.worker_id)
        await self.supervisor.refresh()
        narrate("worker_get", f"Worker {worker.worker_id} is {worker.state} at {worker.url}", worker_id=op.worker_id)
        emit_result({"worker": worker.describe()})

    async def worker_stop(self, op: WorkerStop) -> None:
        await self.supervisor.stop(op.worker_id)
        emit_result({"worker_id": op.worker_id, "stopped": True})

    # -- models ---------------------------------------------------------------

    async def model_list(self) -> None:
        models = [m.to_dict() for m in await self.catalog.models()]
        narrate("model_list", f"{len(models)} model(s) on hive {self.hive_id}", models=len(models))
        emit_result({"models": models})

    async def model_get(self, op: ModelGet) -> None:
        model = await self.catalog.resolve(op.model)
        narrate("model_get", f"Model {model.id}: {model.architecture}, {model.quantization}", model=model.id)
        emit_result({"model": model.to_dict()})

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

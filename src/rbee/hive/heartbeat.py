"""Heartbeats: the hive tells the queen what it is, what it has and what runs on it.

Every ``interval_s`` (and at once after :meth:`HeartbeatLoop.poke`, when a worker
starts or exits) the hive sends a :class:`~rbee.contracts.cluster.Heartbeat`:
its address, devices, workers (how busy, from each worker's ``/v1/ready``,
polled in parallel with a short timeout, with each one's resident memory), its
memory (:class:`~rbee.contracts.cluster.HostMemory`: RAM, GPUs' VRAM, the
``--memory-limit``) and models (each with what one worker of it would need
here). The last one, sent as the hive stops, says ``goodbye``; a hive serving HTTPS
says which certificate (``tls_fingerprint``). Delivery is a callable:
an HTTP POST to the queen (:class:`HttpDelivery`, through a client that pins the
queen's certificate when the hive was given ``--queen-fingerprint``), or a
direct call when the hive runs inside the queen's process. A queen that cannot be reached is
reported once per outage and retried every interval; the loop never dies of it.
"""

from __future__ import annotations

import asyncio
import inspect
import platform
import random
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import psutil

from rbee import __version__
from rbee.contracts.cluster import GpuMemory, Heartbeat, HostMemory, ModelReport
from rbee.hive.catalog import ModelCatalog, ModelEntry
from rbee.hive.supervisor import Supervisor
from rbee.narration import narrate

__all__ = ["HeartbeatLoop", "HttpDelivery", "Deliver", "DeviceProbe"]

Deliver = Callable[[Heartbeat], Awaitable[Any] | Any]

_GPU_QUERY = "index,name,memory.total,memory.used,utilization.gpu"
_GPU_CACHE_S = 10.0


class HttpDelivery:
    """POST each heartbeat to ``{queen_url}/v1/hives/heartbeat``."""

    def __init__(self, queen_url: str, http: httpx.AsyncClient, *, token: str | None = None, timeout_s: float = 5.0):
        self.url = queen_url.rstrip("/") + "/v1/hives/heartbeat"
        self.http = http
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s = timeout_s

    async def __call__(self, beat: Heartbeat) -> None:
        response = await self.http.post(
            self.url,
            content=beat.model_dump_json(),
            headers={**self.headers, "Content-Type": "application/json"},
            timeout=self.timeout_s,
        )
        if response.status_code != 200:
            raise RuntimeError(f"{self.url} answered {response.status_code}: {response.text[:200]}")

    def __str__(self) -> str:
        return self.url


class DeviceProbe:
    """What this machine computes with: the CPU always, NVIDIA GPUs when ``nvidia-smi`` is there."""

    def __init__(self) -> None:
        self._nvidia_smi = shutil.which("nvidia-smi")
        self._gpus: list[dict[str, Any]] = []
        self._gpus_at = float("-inf")

    def cpu(self) -> dict[str, Any]:
        memory = psutil.virtual_memory()
        return {
            "id": "cpu",
            "kind": "cpu",
            "name": platform.processor() or platform.machine(),
            "cores": psutil.cpu_count(logical=True),
            "physical_cores": psutil.cpu_count(logical=False),
            "memory_bytes": memory.total,
            "memory_available_bytes": memory.available,
        }

    async def gpus(self) -> list[dict[str, Any]]:
        if self._nvidia_smi is None:
            return []
        now = time.monotonic()
        if now - self._gpus_at < _GPU_CACHE_S:
            return self._gpus
        self._gpus_at = now
        self._gpus = await self._query_nvidia_smi(self._nvidia_smi)
        return self._gpus

    async def _query_nvidia_smi(self, exe: str) -> list[dict[str, Any]]:
        try:
            proc = await asyncio.create_subprocess_exec(
                exe,
                f"--query-gpu={_GPU_QUERY}",
                "--format=csv,noheader,nounits",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError:
            return []
        try:
            async with asyncio.timeout(3.0):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return []
        gpus = []
        for line in out.decode(errors="replace").splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 5 or not parts[0].isdigit():
                continue
            gpus.append(
                {
                    "id": f"cuda:{parts[0]}",
                    "kind": "cuda",
                    "name": parts[1],
                    "memory_bytes": _mib(parts[2]),
                    "memory_used_bytes": _mib(parts[3]),
                    "utilization_pct": _number(parts[4]),
                }
            )
        return gpus

    async def all(self) -> list[dict[str, Any]]:
        return [self.cpu(), *await self.gpus()]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _mib(text: str) -> int | None:
    value = _number(text)
    return None if value is None else int(value * 1024 * 1024)


#: The longest wait between heartbeats while they fail (the time a hive may take to be seen
#: again once its queen is back).
MAX_BACKOFF_S = 8.0


class HeartbeatLoop:
    """Builds and delivers heartbeats; run :meth:`run` as a task the app owns."""

    def __init__(
        self,
        *,
        hive_id: str,
        url: str,
        supervisor: Supervisor,
        catalog: ModelCatalog,
        deliver: Deliver,
        interval_s: float = 2.0,
        devices: DeviceProbe | None = None,
        poll_timeout_s: float = 1.0,
        target: str = "the queen",
        address: Callable[[], str] | None = None,
        tls_fingerprint: str | None = None,
    ) -> None:
        self.hive_id = hive_id
        self.tls_fingerprint = tls_fingerprint
        self.url = url
        #: The hive's URL as it is now (a hive bound to every address follows its machine's
        #: address from one heartbeat to the next); None: ``url`` never changes.
        self.address = address
        self.supervisor = supervisor
        self.catalog = catalog
        self.deliver = deliver
        self.interval_s = interval_s
        self.devices = devices or DeviceProbe()
        self.poll_timeout_s = poll_timeout_s
        self.target = target
        self.sent = 0
        self.failures = 0
        self.attempted = asyncio.Event()  # set after the first attempt, delivered or not
        self.delivered = asyncio.Event()  # set after the first successful delivery
        self._poke = asyncio.Event()
        self._started = 0  # beats begun
        self._arrived = 0  # the number of the latest beat delivered
        self._arrival = asyncio.Event()

    def poke(self) -> None:
        """Send a heartbeat now (a worker started or exited)."""
        self._poke.set()

    async def sync(self, timeout_s: float = 3.0) -> bool:
        """Send a heartbeat built after this call and wait (bounded) until it arrives.

        After a model lands or goes, the queen knows before the job ends, so
        the next ``rbee infer`` finds it. True when it arrived in time.
        """
        need = self._started + 1
        self.poke()
        try:
            async with asyncio.timeout(timeout_s):
                while self._arrived < need:
                    arrival = self._arrival
                    await arrival.wait()
        except TimeoutError:
            return False
        return True

    async def memory(self) -> HostMemory:
        """RAM (psutil), each GPU's VRAM when the device probe has its figures, and the hive's cap."""
        ram = psutil.virtual_memory()
        gpus = []
        for gpu in await self.devices.gpus():
            total, used = gpu.get("memory_bytes"), gpu.get("memory_used_bytes")
            index = str(gpu.get("id", "")).partition(":")[2]
            if isinstance(total, int) and isinstance(used, int) and index.isdigit():
                name = gpu.get("name")
                gpus.append(
                    GpuMemory(
                        index=int(index),
                        name=name if isinstance(name, str) else None,
                        total_bytes=total,
                        free_bytes=max(0, total - used),
                    )
                )
        return HostMemory(
            total_bytes=int(ram.total),
            available_bytes=int(ram.available),
            gpus=gpus,
            limit_bytes=self.supervisor.memory_limit_bytes,
        )

    def _model_report(self, model: ModelEntry) -> ModelReport:
        report = model.to_report()
        try:
            need = self.supervisor.worker_bytes(model)
        except OSError:
            return report
        return report.model_copy(update={"worker_memory_bytes": need})

    async def build(self, *, goodbye: bool = False) -> Heartbeat:
        # Busy/idle comes from the workers themselves, all asked at once.
        if self.address is not None:
            self.url = self.address()
        await self.supervisor.refresh(self.poll_timeout_s)
        models = await self.catalog.models()
        return Heartbeat(
            hive_id=self.hive_id,
            url=self.url,
            version=__version__,
            interval_s=self.interval_s,
            devices=await self.devices.all(),
            workers=[w.report() for w in self.supervisor.all()],
            models=[self._model_report(m) for m in models],
            memory=await self.memory(),
            worker_tokens={w.worker_id: w.token for w in self.supervisor.all() if w.token},
            goodbye=goodbye,
            tls_fingerprint=self.tls_fingerprint,
        )

    async def beat(self, *, goodbye: bool = False) -> bool:
        """Build and deliver one heartbeat (``goodbye``: the hive's last); True when it arrived."""
        self._started += 1
        number = self._started
        try:
            beat = await self.build(goodbye=goodbye)
            result = self.deliver(beat)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            if self.failures == 1:
                narrate(
                    "heartbeat_failed",
                    f"Cannot deliver heartbeats to {self.target}: {_why(exc)}; retrying, backing off"
                    f" up to {max(MAX_BACKOFF_S, self.interval_s):g} s between tries",
                    level="warn",
                    actor="hive",
                    hive_id=self.hive_id,
                )
            return False
        finally:
            self.attempted.set()
        if self.failures:
            narrate(
                "heartbeat_restored",
                f"Heartbeats reach {self.target} again (after {self.failures} failed)",
                actor="hive",
                hive_id=self.hive_id,
            )
            self.failures = 0
        self.sent += 1
        self.delivered.set()
        self._arrived = max(self._arrived, number)
        self._arrival.set()
        self._arrival = asyncio.Event()
        return True

    def next_wait_s(self) -> float:
        """How long until the next beat: the interval, or after failures an interval that
        doubles up to :data:`MAX_BACKOFF_S`, with +-20 % jitter so that hives cut off together
        do not all come back in the same instant (a queen restarting, a switch rebooted)."""
        if not self.failures:
            return self.interval_s
        backoff = min(self.interval_s * 2 ** (self.failures - 1), max(MAX_BACKOFF_S, self.interval_s))
        return backoff * random.uniform(0.8, 1.2)

    async def run(self) -> None:
        while True:
            self._poke.clear()
            await self.beat()
            try:
                async with asyncio.timeout(self.next_wait_s()):
                    await self._poke.wait()
            except TimeoutError:
                pass


def _why(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]

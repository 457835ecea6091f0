"""Cluster contracts: what a hive tells the queen in its heartbeat.

``POST /v1/hives/heartbeat`` on the queen, every 2 s from each hive (and at once
when a worker starts or exits). A worker's ``state`` is one of ``starting``,
``ready``, ``busy``, ``stopping``, ``dead``.

A hive with a token gives each worker a token of its own; the heartbeat carries
them in ``worker_tokens`` (worker id -> token), so the queen can reach the
workers. They travel only on this authenticated hive-to-queen channel and are
never part of a :class:`WorkerReport`, which clients are shown.

A hive that stops sends one last heartbeat with ``goodbye`` set (its workers
already stopped): the queen shows it ``offline`` at once, schedules nothing on
it and forgets it as it forgets a silent hive. Its next ordinary heartbeat (a
restart) brings it back ``online``.

A hive that serves HTTPS reports its certificate's SHA-256 fingerprint
(``tls_fingerprint``, ``SHA256:<base64>``); its workers serve the same
certificate, and the queen connects to the hive and to them pinned to it
(:mod:`rbee.wire.tls`), refusing one that presents another.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = ["Heartbeat", "HostMemory", "GpuMemory", "WorkerReport", "ModelReport"]


class WorkerReport(BaseModel):
    worker_id: str
    model: str
    model_aliases: list[str] = Field(default_factory=list)
    device: str = "cpu"
    state: str  # starting | ready | busy | stopping | dead
    url: str | None = None
    pid: int | None = None
    slots: int = 1
    busy_slots: int = 0
    queue: int = 0
    #: The context of one slot, in tokens (None: not known yet).
    n_ctx: int | None = None
    started_at: float | None = None
    current_job: str | None = None
    #: How long the worker is kept once idle, in seconds (-1: for ever; 0: stopped after its job).
    keep_alive_s: float | None = None
    #: Wall-clock time the worker became idle (None while it has a job).
    idle_since: float | None = None
    #: Wall-clock time its hive will stop it if it stays idle (None: never, or busy).
    unloads_at: float | None = None
    #: Memory the worker holds (resident set), in bytes, when the hive measured it.
    memory_bytes: int | None = None


class GpuMemory(BaseModel):
    index: int
    name: str | None = None
    total_bytes: int
    free_bytes: int


class HostMemory(BaseModel):
    """A hive's memory: RAM and, per GPU, VRAM."""

    total_bytes: int
    available_bytes: int
    gpus: list[GpuMemory] = Field(default_factory=list)
    #: The hive's own cap on what its workers may use (a setting, e.g. for tests), if any.
    limit_bytes: int | None = None


class ModelReport(BaseModel):
    id: str
    alias: str | None = None
    size_bytes: int | None = None
    architecture: str | None = None
    quantization: str | None = None
    #: The model's trained context (GGUF ``context_length``).
    context_length: int | None = None
    #: The chat template a chat with this model uses: ``gguf`` (its own), a family's
    #: (``gemma``, ``llama3``...) or ``chatml``.
    chat_template: str | None = None
    #: The model's own template renders tools, so a chat's ``tools`` go to it (``tool_choice`` auto).
    chat_tools: bool = False
    #: What one worker of this model needs on this hive, as the hive estimates it: the
    #: file, the KV cache of the slots and context it would give the worker, and the
    #: worker process itself. The queen places workers by it.
    worker_memory_bytes: int | None = None


class Heartbeat(BaseModel):
    hive_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    url: str
    version: str | None = None
    interval_s: float = 2.0
    devices: list[dict[str, Any]] = Field(default_factory=list)
    workers: list[WorkerReport] = Field(default_factory=list)
    models: list[ModelReport] = Field(default_factory=list)
    memory: HostMemory | None = None
    worker_tokens: dict[str, str] = Field(default_factory=dict, repr=False)
    #: The hive is stopping: this is its last heartbeat.
    goodbye: bool = False
    #: The fingerprint of the certificate the hive and its workers serve (None: plain HTTP,
    #: or a certificate to be verified the usual way).
    tls_fingerprint: str | None = Field(default=None, pattern=r"^SHA256:[A-Za-z0-9+/]{43}$")

"""Cluster contracts: what a hive tells the queen in its heartbeat.

``POST /v1/hives/heartbeat`` on the queen, every 2 s from each hive (and at once
when a worker starts or exits). A worker's ``state`` is one of ``starting``,
``ready``, ``busy``, ``stopping``, ``dead``.

A hive with a token gives each worker a token of its own; the heartbeat carries
them in ``worker_tokens`` (worker id -> token), so the queen can reach the
workers. They travel only on this authenticated hive-to-queen channel and are
never part of a :class:`WorkerReport`, which clients are shown.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = ["Heartbeat", "WorkerReport", "ModelReport"]


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


class ModelReport(BaseModel):
    id: str
    alias: str | None = None
    size_bytes: int | None = None
    architecture: str | None = None
    quantization: str | None = None


class Heartbeat(BaseModel):
    hive_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    url: str
    version: str | None = None
    interval_s: float = 2.0
    devices: list[dict[str, Any]] = Field(default_factory=list)
    workers: list[WorkerReport] = Field(default_factory=list)
    models: list[ModelReport] = Field(default_factory=list)
    worker_tokens: dict[str, str] = Field(default_factory=dict, repr=False)

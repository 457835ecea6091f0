"""The worker: one process, one loaded model, the job API for ``infer``."""

from rbee.worker.app import Worker, WorkerSettings, create_worker_app
from rbee.worker.bridge import run_generation
from rbee.worker.engine import (
    Engine,
    FakeEngine,
    GenerationOutcome,
    GenerationRequest,
    LlamaEngine,
    StopScanner,
)

__all__ = [
    "Engine",
    "FakeEngine",
    "GenerationOutcome",
    "GenerationRequest",
    "LlamaEngine",
    "StopScanner",
    "Worker",
    "WorkerSettings",
    "create_worker_app",
    "run_generation",
]

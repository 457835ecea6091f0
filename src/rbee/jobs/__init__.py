"""The job core: one shape (POST an operation, stream its events, DELETE to cancel) on every server.

The names below are loaded when first used, so importing one small module
(:mod:`rbee.jobs.job`, :mod:`rbee.jobs.timeline`) does not load FastAPI with
the HTTP API (:mod:`rbee.jobs.api`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rbee.jobs.api import JobServer, job_router
    from rbee.jobs.job import Job
    from rbee.jobs.registry import (
        Executor,
        JobRegistry,
        current_job,
        emit_progress,
        emit_result,
        emit_token,
        set_end_fields,
    )

__all__ = [
    "Executor",
    "Job",
    "JobRegistry",
    "JobServer",
    "current_job",
    "emit_progress",
    "emit_result",
    "emit_token",
    "job_router",
    "set_end_fields",
]

_HOMES = {
    "JobServer": "rbee.jobs.api",
    "job_router": "rbee.jobs.api",
    "Job": "rbee.jobs.job",
    **{
        name: "rbee.jobs.registry"
        for name in (
            "Executor",
            "JobRegistry",
            "current_job",
            "emit_progress",
            "emit_result",
            "emit_token",
            "set_end_fields",
        )
    },
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value

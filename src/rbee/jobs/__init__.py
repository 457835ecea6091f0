"""The job core: one shape (POST an operation, stream its events, DELETE to cancel) on every server."""

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

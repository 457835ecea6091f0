"""One exception hierarchy for the whole system.

Each error carries a stable ``kind`` (it travels in the ``end`` event as
``error.kind``) and its docstring is the default message. HTTP statuses are
attached here as data only; the mapping to responses lives at each server's
edge (:mod:`rbee.http`), and the mapping to exit codes in the keeper.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "RbeeError",
    "InvalidOperation",
    "UnsupportedOperation",
    "JobNotFound",
    "JobConflict",
    "JobCancelled",
    "JobTimedOut",
    "PayloadTooLarge",
    "Unauthorized",
    "Forbidden",
    "QueueFull",
    "NoWorkerAvailable",
    "WorkerLost",
    "WorkerFailed",
    "ModelNotFound",
    "HiveNotFound",
    "HiveUnreachable",
    "HiveOffline",
    "WorkerNotFound",
    "GenerationError",
    "QueenUnreachable",
    "Unreachable",
    "StreamBroken",
    "AmbiguousJobId",
    "GGUFError",
    "DownloadFailed",
    "ChecksumMismatch",
    "DownloadRefused",
]


class RbeeError(Exception):
    """Something went wrong in rbee."""

    kind: str = "internal"
    status_code: int = 500

    def __init__(self, message: str | None = None, **data: Any) -> None:
        self.message = message or (self.__doc__ or self.kind).strip()
        self.data = data
        super().__init__(self.message)

    def to_error(self) -> dict[str, Any]:
        """The ``{"kind", "message"}`` object of the ``end`` event."""
        return {"kind": self.kind, "message": self.message}

    def to_wire(self) -> dict[str, Any]:
        """The error object of an HTTP answer's ``{"error": ...}`` (:func:`rbee.wire.errors.from_wire` reads it back).

        ``QueueFull``'s ``retry_after_s`` travels in the ``Retry-After`` header, not here.
        """
        return self.to_error()


class InvalidOperation(RbeeError):
    """The operation is malformed or a field is out of range."""

    kind = "invalid_operation"
    status_code = 422

    def __init__(self, message: str | None = None, *, field: str | None = None, **data: Any) -> None:
        super().__init__(message, **data)
        self.field = field

    def to_wire(self) -> dict[str, Any]:
        wire = {**self.to_error(), "field": self.field}
        if "problems" in self.data:
            wire["problems"] = self.data["problems"]
        return wire


class UnsupportedOperation(RbeeError):
    """This server has no handler for that operation."""

    kind = "unsupported_operation"
    status_code = 422


class JobNotFound(RbeeError):
    """No job with that id."""

    kind = "job_not_found"
    status_code = 404


class JobConflict(RbeeError):
    """The job is in a state that does not allow this."""

    kind = "conflict"
    status_code = 409


class JobCancelled(RbeeError):
    """The job was cancelled."""

    kind = "cancelled"
    status_code = 409


class JobTimedOut(RbeeError):
    """The job ran past its deadline."""

    kind = "timed_out"
    status_code = 504


class PayloadTooLarge(RbeeError):
    """The request body is larger than the server accepts."""

    kind = "payload_too_large"
    status_code = 413


class Unauthorized(RbeeError):
    """A valid bearer token is required."""

    kind = "unauthorized"
    status_code = 401


class Forbidden(RbeeError):
    """This token may not do that; the admin token may."""

    kind = "forbidden"
    status_code = 403


class QueueFull(RbeeError):
    """The queue is full; try again later."""

    kind = "queue_full"
    status_code = 429

    def __init__(self, message: str | None = None, *, retry_after_s: int = 1, **data: Any) -> None:
        super().__init__(message, **data)
        self.retry_after_s = retry_after_s


class NoWorkerAvailable(RbeeError):
    """No worker can serve this model."""

    kind = "no_worker"
    status_code = 503


class WorkerLost(RbeeError):
    """The worker went away in the middle of the job."""

    kind = "worker_lost"
    status_code = 502


class WorkerFailed(RbeeError):
    """The worker reported a failure."""

    kind = "worker_failed"
    status_code = 502


class ModelNotFound(RbeeError):
    """No such model."""

    kind = "model_not_found"
    status_code = 404


class HiveNotFound(RbeeError):
    """No such hive."""

    kind = "hive_not_found"
    status_code = 404


class HiveUnreachable(RbeeError):
    """The hive did not answer."""

    kind = "hive_unreachable"
    status_code = 502


class HiveOffline(RbeeError):
    """The hive has stopped sending heartbeats."""

    kind = "hive_offline"
    status_code = 409


class WorkerNotFound(RbeeError):
    """No such worker."""

    kind = "worker_not_found"
    status_code = 404


class GenerationError(RbeeError):
    """The engine failed while generating."""

    kind = "generation_error"
    status_code = 500


class QueenUnreachable(RbeeError):
    """The queen did not answer."""

    kind = "queen_unreachable"
    status_code = 502


class Unreachable(RbeeError):
    """The server did not answer."""

    kind = "unreachable"
    status_code = 502


class StreamBroken(RbeeError):
    """The event stream closed before the job's end."""

    kind = "stream_broken"
    status_code = 502


class AmbiguousJobId(RbeeError):
    """A short job id that is the start of more than one job's id."""

    kind = "ambiguous_job_id"
    status_code = 400


class GGUFError(RbeeError):
    """The file is not a readable GGUF model."""

    kind = "invalid_model_file"
    status_code = 422


class DownloadFailed(RbeeError):
    """The model could not be downloaded."""

    kind = "download_failed"
    status_code = 502


class ChecksumMismatch(RbeeError):
    """The downloaded file does not have the expected SHA-256."""

    kind = "checksum_mismatch"
    status_code = 502


class DownloadRefused(InvalidOperation):
    """The download policy refuses this source."""

    kind = "download_refused"
    status_code = 403

"""A remote error, rebuilt from its wire shape as the same :class:`~rbee.errors.RbeeError`.

A server answers a refused request with its status, ``{"error": {"kind",
"message", ...}}`` (:meth:`RbeeError.to_wire <rbee.errors.RbeeError.to_wire>`)
and, for ``429``, a ``Retry-After`` header. :func:`from_wire` turns that back
into the class its ``kind`` names, with its data (``field``, ``problems``,
``retry_after_s``); a kind this side does not know stays a plain
:class:`~rbee.errors.RbeeError` that keeps the remote kind and status, so
nothing is lost on the way through.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rbee import errors

__all__ = ["KINDS", "error_object", "from_response", "from_wire"]


def _kinds() -> dict[str, type[errors.RbeeError]]:
    found: dict[str, type[errors.RbeeError]] = {}
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.RbeeError) and cls is not errors.RbeeError:
            found.setdefault(cls.kind, cls)
    return found


#: Every error class of :mod:`rbee.errors`, by its ``kind``.
KINDS: dict[str, type[errors.RbeeError]] = _kinds()


def from_wire(
    error: Mapping[str, Any], *, status: int | None = None, retry_after: str | None = None
) -> errors.RbeeError:
    """The error an ``{"error": ...}`` object (and its answer's status and ``Retry-After``) stands for."""
    kind = str(error.get("kind") or "internal")
    cls = KINDS.get(kind, errors.RbeeError)
    data = {k: v for k, v in error.items() if k not in ("kind", "message")}
    exc = cls(str(error.get("message") or "") or None)
    exc.data.update(data)
    if status is not None:
        exc.status_code = status
    if cls is errors.RbeeError:
        exc.kind = kind
    if isinstance(exc, errors.InvalidOperation):
        field = error.get("field")
        exc.field = str(field) if field is not None else None
    if isinstance(exc, errors.QueueFull):
        exc.retry_after_s = _seconds(retry_after, exc.retry_after_s)
    return exc


def error_object(body: bytes) -> dict[str, Any] | None:
    """The ``error`` object of an answer's JSON body; None for a body of another shape."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, dict) else None


def from_response(status: int, headers: Mapping[str, str], body: bytes) -> errors.RbeeError:
    """The error a 4xx/5xx answer carries; one without rbee's error shape keeps its status and text.

    ``headers`` is looked up with lower-case names.
    """
    error = error_object(body)
    if error is None:
        text = body.decode("utf-8", errors="replace")[:200]
        exc = errors.RbeeError(f"HTTP {status}: {text}")
        exc.status_code = status
        return exc
    return from_wire(error, status=status, retry_after=headers.get("retry-after"))


def _seconds(value: str | None, default: int) -> int:
    try:
        return max(0, int(value)) if value else default
    except ValueError:
        return default

"""OpenAI's error object, written once for every server: the edge's refusals (``rbee.http``) and
the OpenAI-shaped routes (``rbee.queen.openai.errors``) both build it here."""

from __future__ import annotations

from typing import Any

__all__ = ["openai_error_body", "openai_error_type"]


def openai_error_type(status: int) -> str:
    """OpenAI's ``type`` for a status: a bad or missing key is ``invalid_request_error`` there too."""
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_error_body(message: str, *, status: int, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": openai_error_type(status), "param": param, "code": code}}

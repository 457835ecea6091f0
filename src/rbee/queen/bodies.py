"""What every HTTP API on the queen (OpenAI, Ollama, Anthropic, Responses, tokens) shares at its edge.

Request bodies are read as JSON and checked field by field, so each API can name
the field in its own error shape; these are the checks and the OpenAPI body they
all declare, written once.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from rbee import errors
from rbee.queen.state import QueenState

__all__ = ["body_schema", "invalid", "number", "queen_state"]


def queen_state(request: Request) -> QueenState:
    state: QueenState = request.app.state.queen
    return state


def body_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def invalid(field: str, why: str) -> errors.InvalidOperation:
    return errors.InvalidOperation(f"{field}: {why}", field=field)


def number(body: dict[str, Any], name: str, *, integer: bool = False, low: float = 0, high: float | None = None) -> Any:
    """``body[name]`` when it is a number in ``[low, high]`` (None when absent); else :func:`invalid`."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        raise invalid(name, f"must be {'an integer' if integer else 'a number'}, not {value!r}")
    if value < low or (high is not None and value > high):
        raise invalid(name, f"must be {'at least ' + str(low) if high is None else f'between {low} and {high}'}")
    return value

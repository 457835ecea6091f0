"""Tokenizer and embeddings endpoints on the queen, in the shapes clients already speak.

* ``POST /tokenize`` and ``POST /detokenize`` (also under ``/v1/``): llama.cpp
  server's shapes (``{"content", "add_special", "parse_special", "with_pieces"}``
  -> ``{"tokens": [...]}``; ``{"tokens"}`` -> ``{"content"}``), with an optional
  ``model`` (default :data:`~rbee.contracts.operations.DEFAULT_MODEL`).
* ``POST /v1/embeddings``: OpenAI's shape. The vectors are mean-pooled and
  L2-normalised, as llama.cpp's server gives them with ``--embeddings --pooling
  mean``; ``encoding_format`` ``float`` or ``base64`` (little-endian float32, what
  the official SDK asks for); ``dimensions`` is refused unless it is the model's.

Each request is forwarded to a ready worker of the model (the least busy), which
answers from its own tokenizer or its own embeddings context; nothing is queued
as a job. None of them starts a worker: with no ready worker of the model the
answer is ``503`` saying so (a completion request, or ``rbee worker spawn``,
starts one). Errors are OpenAI's ``{"error": {"message", "type", "param",
"code"}}``; bad input is ``400`` naming the field in ``param``.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from rbee import errors
from rbee.contracts.operations import DEFAULT_MODEL, Infer
from rbee.queen.bodies import body_schema as _body_schema
from rbee.queen.bodies import queen_state as _state
from rbee.queen.openai.errors import rbee_error_response as _rbee_error_response
from rbee.queen.state import QueenState
from rbee.queen.telemetry import WorkerView
from rbee.queen.translate import json_body as _json_body
from rbee.worker.app import MAX_EMBED_INPUTS, DetokenizeBody, TokenizeBody

__all__ = ["TOKENIZE_TIMEOUT_S", "EMBED_TIMEOUT_S", "tokens_router"]

TOKENIZE_TIMEOUT_S = 30.0
#: An embeddings request runs on the worker's CPU or GPU; a long batch takes a while.
EMBED_TIMEOUT_S = 600.0


def _refuse(param: str | None, why: str) -> errors.InvalidOperation:
    return errors.InvalidOperation(f"{param}: {why}" if param else why, field=param)


def _model(body: Any) -> str:
    if not isinstance(body, dict):
        raise _refuse(None, "the body must be a JSON object")
    model = body.get("model")
    if model is None:
        return DEFAULT_MODEL
    if not isinstance(model, str) or not model:
        raise _refuse("model", "must be a model's name")
    return model


def _ready_workers(state: QueenState, model: str) -> list[WorkerView]:
    """Ready workers of ``model`` with an address, the least busy first."""
    workers = [w for w in state.scheduler.candidates(Infer.model_construct(model=model), set()) if w.report.url]
    return sorted(workers, key=lambda w: state.scheduler.inflight.get(w.worker_id, 0))


def _no_worker(state: QueenState, model: str, what: str) -> errors.RbeeError:
    known = any(h.has_model(model) for h in state.telemetry.hives()) or any(
        w.serves(model) for w in state.telemetry.workers(fresh_only=False)
    )
    if not known and state.telemetry.hives():
        models = sorted({m.alias or m.id for h in state.telemetry.hives() for m in h.models})
        return errors.ModelNotFound(
            f"no hive has a model {model!r} (models: {', '.join(models) or 'none'})", model=model
        )
    return errors.NoWorkerAvailable(
        f"no worker of {model!r} is ready; {what} runs on a running worker of the model and does not start one"
        " (a completion request or `rbee worker spawn` starts one)"
    )


async def forward(state: QueenState, model: str, path: str, payload: dict[str, Any], what: str) -> dict[str, Any]:
    """POST ``payload`` to ``path`` on a ready worker of ``model``; its answer, or its refusal raised."""
    timeout = EMBED_TIMEOUT_S if path == "/v1/embeddings" else TOKENIZE_TIMEOUT_S
    for worker in _ready_workers(state, model):
        token = worker.token or state.settings.token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        try:
            response = await state.http.post(
                f"{worker.report.url}{path}", json=payload, headers=headers, timeout=timeout
            )
        except httpx.HTTPError:
            continue
        if response.status_code == 503:  # still loading, or its model failed: another one may do
            continue
        if response.status_code == 422:
            error = response.json().get("error") or {}
            raise errors.InvalidOperation(
                str(error.get("message") or "the worker refused the input"), field=error.get("field")
            )
        if response.status_code != 200:
            raise errors.WorkerFailed(f"worker {worker.worker_id} answered {path} with {response.status_code}")
        answer: dict[str, Any] = response.json()
        return answer
    raise _no_worker(state, model, what)


def _validated(model: type[TokenizeBody] | type[DetokenizeBody], body: dict[str, Any]) -> dict[str, Any]:
    try:
        parsed = model.model_validate({k: v for k, v in body.items() if k != "model"})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.get("loc", ())).lstrip(".")
        raise _refuse(field or None, str(first.get("msg", "invalid"))) from None
    return parsed.model_dump()


async def _tokenize(request: Request) -> Response:
    state = _state(request)
    try:
        body = await _json_body(request)
        model = _model(body)
        answer = await forward(state, model, "/tokenize", _validated(TokenizeBody, body), "tokenizing")
    except errors.RbeeError as exc:
        return _rbee_error_response(exc)
    return JSONResponse(answer)


async def _detokenize(request: Request) -> Response:
    state = _state(request)
    try:
        body = await _json_body(request)
        model = _model(body)
        answer = await forward(state, model, "/detokenize", _validated(DetokenizeBody, body), "detokenizing")
    except errors.RbeeError as exc:
        return _rbee_error_response(exc)
    return JSONResponse(answer)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _inputs(raw: Any) -> list[str | list[int]]:
    """OpenAI's ``input``: a string, a list of strings, a token array or a list of token arrays."""
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list):
        raise _refuse("input", "must be a string, a list of strings, a list of token ids or a list of such lists")
    if not raw:
        raise _refuse("input", "at least one input is needed")
    if len(raw) > MAX_EMBED_INPUTS:
        raise _refuse("input", f"{len(raw)} inputs; at most {MAX_EMBED_INPUTS} in one request")
    if all(_is_id(x) for x in raw):
        return [list(raw)]
    for i, item in enumerate(raw):
        if not isinstance(item, str) and not (isinstance(item, list) and all(_is_id(x) for x in item)):
            raise _refuse(f"input[{i}]", "must be a string or a list of token ids")
    return list(raw)


def _embedding(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def _embeddings(request: Request) -> Response:
    state = _state(request)
    try:
        body = await _json_body(request)
        model = _model(body)
        if "input" not in body:
            raise _refuse("input", "is required")
        inputs = _inputs(body["input"])
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _refuse("encoding_format", f"must be 'float' or 'base64', not {encoding!r}")
        dimensions = body.get("dimensions")
        if dimensions is not None and (not _is_id(dimensions) or dimensions < 1):
            raise _refuse("dimensions", f"must be a positive integer, not {dimensions!r}")
        answer = await forward(
            state, model, "/v1/embeddings", {"input": inputs, "dimensions": dimensions}, "computing embeddings"
        )
    except errors.RbeeError as exc:
        return _rbee_error_response(exc)
    tokens = int(answer["prompt_tokens"])
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _embedding(v, encoding)}
                for i, v in enumerate(answer["data"])
            ],
            "model": answer.get("model") or model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


# -- the OpenAPI description ---------------------------------------------------

_IDS = {"type": "array", "items": {"type": "integer"}}
_MODEL = {"model": {"type": "string", "minLength": 1, "description": f"default: {DEFAULT_MODEL}"}}
_TOKENIZE_BODY = {
    "type": "object",
    "required": ["content"],
    "properties": {
        **_MODEL,
        "content": {"type": "string"},
        "add_special": {"type": "boolean"},
        "parse_special": {"type": "boolean"},
        "with_pieces": {"type": "boolean"},
    },
}
_DETOKENIZE_BODY = {"type": "object", "required": ["tokens"], "properties": {**_MODEL, "tokens": _IDS}}
_EMBEDDINGS_BODY = {
    "type": "object",
    "required": ["input"],
    "properties": {
        **_MODEL,
        "input": {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "maxItems": MAX_EMBED_INPUTS, "items": {"type": "string"}},
                {"type": "array", "minItems": 1, "items": {"type": "integer"}},
                {"type": "array", "minItems": 1, "maxItems": MAX_EMBED_INPUTS, "items": _IDS},
            ]
        },
        "encoding_format": {"enum": ["float", "base64"]},
        "dimensions": {"type": "integer", "minimum": 1},
        "user": {"type": "string"},
    },
}
_OPENAI_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid request (param names the field)", "content": _OPENAI_ERROR},
    404: {"description": "no hive has the model", "content": _OPENAI_ERROR},
    502: {"description": "the worker failed", "content": _OPENAI_ERROR},
    503: {"description": "no worker of the model is ready (none is started for this)", "content": _OPENAI_ERROR},
}


def tokens_router() -> APIRouter:
    router = APIRouter(tags=["tokens"])

    for prefix in ("", "/v1"):

        @router.post(
            f"{prefix}/tokenize",
            summary="Text to token ids on a ready worker of the model (llama.cpp server's shape)",
            response_model=None,
            responses=_ERRORS,
            openapi_extra=_body_schema(_TOKENIZE_BODY),
        )
        async def tokenize(request: Request) -> Response:
            return await _tokenize(request)

        @router.post(
            f"{prefix}/detokenize",
            summary="Token ids to text on a ready worker of the model (llama.cpp server's shape)",
            response_model=None,
            responses=_ERRORS,
            openapi_extra=_body_schema(_DETOKENIZE_BODY),
        )
        async def detokenize(request: Request) -> Response:
            return await _detokenize(request)

    @router.post(
        "/v1/embeddings",
        summary="Embeddings of texts or token arrays (OpenAI's shape; mean-pooled, unit length)",
        response_model=None,
        responses=_ERRORS,
        openapi_extra=_body_schema(_EMBEDDINGS_BODY),
    )
    async def embeddings(request: Request) -> Response:
        return await _embeddings(request)

    return router

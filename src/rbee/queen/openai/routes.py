"""The OpenAI-compatible API on the queen: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Every request becomes an ordinary ``infer`` job in the queen's registry, so it
is admitted, scheduled, queued, narrated, cancellable (``DELETE /v1/jobs/{id}``)
and kept in the history like any other; the ``x-rbee-job-id`` header names it.
The endpoints read the job's events in process and translate them:

* not streaming: the answer is sent once the job has ended;
* streaming: the response starts with the first token (or the end, whichever
  comes first), so anything that fails before a token is generated -- a worker
  that refuses the prompt, a queue that overflowed -- is still answered with a
  proper status. After that, a failure is sent as an error chunk
  (``data: {"error": {...}}``) and the stream closes without ``[DONE]``.

A client that goes away cancels its job, which frees the worker.

Defaults follow OpenAI's: ``temperature`` 1, ``top_p`` 1, ``n`` 1; ``max_tokens``
defaults to 16 for completions (as OpenAI documents); a chat without it generates
until the slot's context is full, as llama.cpp's server does: ``max_tokens`` becomes
what the smallest context of the model's ready workers (``n_ctx`` of their reports)
leaves after the prompt, as one of them counts it (``POST /v1/tokens/count``), and the
job is marked ``to_the_context`` so the worker that runs it (the first one may still be
starting) bounds it by its own context. llama.cpp's
``n_predict`` is ``max_tokens`` (negative: to the end of the context). An input too long
for the context is OpenAI's ``context_length_exceeded`` (``param`` messages or prompt).
Each option is enforced in the worker's native sampler chain of the sequence:
``response_format`` (``json_object``; ``json_schema``, compiled to a GBNF grammar)
and llama.cpp's own ``grammar`` (GBNF) and ``json_schema``; ``presence_penalty``,
``frequency_penalty``, llama.cpp's ``repeat_penalty`` (over the last 64 tokens);
``logit_bias`` (ids checked against the model's vocabulary); ``min_p``, ``top_k``,
``seed``; ``logprobs`` with ``top_logprobs`` 0..20 (chats) or ``logprobs`` 0..5
(completions), from the model's logits before the chain. A grammar, schema or
token id the worker cannot use is a ``400`` naming the field. ``usage`` has
``prompt_tokens_details.cached_tokens`` (prompt tokens the worker's slot already
held), answers a ``system_fingerprint`` and an ``x-request-id`` header.

Tools: ``tool_choice`` ``required`` or a named function makes the answer a call,
generated under the call's JSON schema (``{"name": const, "arguments": <parameters>}``
of one of the functions, given to the job as ``json_schema``) and answered as
``message.tool_calls`` with ``finish_reason: "tool_calls"`` (streamed as tool-call
deltas: id, type and name first, then the arguments' text). The functions are told
to the model in the system turn. ``none`` answers text. ``auto`` (the default with
tools) gives the tools to a model whose own chat template renders them (the hive's
catalog reads that from the GGUF: ``chat_tools``) and reads its calls from the answer in
its family's format (:mod:`rbee.queen.toolcalls`: Hermes/Qwen ``<tool_call>``, Llama's
JSON, Mistral's ``[TOOL_CALLS]``): ``message.tool_calls`` with any text before them as
``content`` and ``finish_reason: "tool_calls"``; streamed, the text is sent until a
call opens, then each call as tool-call deltas once it is complete
(``parallel_tool_calls: false`` keeps the first). With any other model ``auto``
answers as ``none`` and the job's narration says so (``openai_tools_auto``). Infer's
turns are system, user and assistant only, so a tool result (``role: tool``) is rendered
here as a user turn ``Tool result (name): ...`` and an assistant's ``tool_calls`` as
their JSON; the worker is unchanged.

``n`` (1..8) runs one job a choice (seeds ``seed + i`` when a seed is given), answers
the choices with their ``index`` and ``usage`` summed (the prompt counted once),
interleaves the streamed chunks, and cancels them all when the client goes;
``x-rbee-job-id`` names the first job, ``x-rbee-job-ids`` all.

Body parameters are taken as OpenAI takes them: one that is not part of the endpoint's
API is a ``400`` ``unknown_parameter`` naming it ("Unrecognized request argument
supplied: foo"); one of OpenAI's that rbee cannot honour (``audio``, ``modalities``
other than text, ``prediction``, ``web_search_options``, ``reasoning_effort``,
``store: true``, ``best_of`` > 1, ``echo``, the deprecated ``functions``) and llama.cpp's
samplers rbee lacks (``mirostat``, ``typical_p``...) are a ``400``
``unsupported_parameter`` naming it and saying why. The informational ones (``user``,
``metadata``, ``store: false``, ``service_tier``, ``prompt_cache_key``,
``safety_identifier``, llama.cpp's ``cache_prompt``) are accepted, and so are
llama.cpp's own that rbee honours (``grammar``, ``json_schema``, ``n_predict``,
``min_p``, ``repeat_penalty``, ``top_k``) and Ollama's ``keep_alive``.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from rbee import __version__, errors
from rbee.contracts.operations import LIMITS, Infer, parse_keep_alive, parse_operation
from rbee.jobs.job import Job
from rbee.narration import bound, narrate
from rbee.queen.bodies import body_schema as _body_schema
from rbee.queen.bodies import queen_state as _state
from rbee.queen.scheduler import COUNT_TIMEOUT_S, _input_bound
from rbee.queen.toolcalls import ToolCall, ToolCallScanner
from rbee.queen.toolcalls import parse as parse_tool_calls

if TYPE_CHECKING:
    from rbee.queen.app import QueenState
    from rbee.queen.telemetry import WorkerView

__all__ = [
    "DEFAULT_CHAT_MAX_TOKENS",
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "JOB_ID_HEADER",
    "openai_error_body",
    "openai_router",
]

JOB_ID_HEADER = "x-rbee-job-id"
#: ``n`` > 1: every choice's job, in order (``x-rbee-job-id`` names the first).
JOB_IDS_HEADER = "x-rbee-job-ids"
#: The most choices one request may ask for (``n``).
MAX_CHOICES = 8
#: The most tools one chat may offer (as many as Infer takes to a chat template).
MAX_TOOLS = 128
REQUEST_ID_HEADER = "x-request-id"
#: The most alternatives a token's log-probability comes with (OpenAI's limits).
CHAT_TOP_LOGPROBS = 20
COMPLETION_TOP_LOGPROBS = 5
DEFAULT_COMPLETION_MAX_TOKENS = 16
DEFAULT_CHAT_MAX_TOKENS = 1024

_DONE = b"data: [DONE]\n\n"
_CLIENT_GONE = 499  # nginx's "client closed request": nobody reads it, the log does

T = TypeVar("T")
_Events = AsyncGenerator[tuple[str, Any], None]

# -- errors ------------------------------------------------------------------

_STATUS_BY_KIND: dict[str, int] = {
    cls.kind: cls.status_code
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.RbeeError) and cls is not errors.RbeeError
}


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_error_body(message: str, *, status: int, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": _error_type(status), "param": param, "code": code}}


def _status_of(kind: str) -> int:
    status = _STATUS_BY_KIND.get(kind, 500)
    # OpenAI answers bad input with 400; rbee's 422 means the same here.
    return 400 if status == 422 else status


def _error_response(
    message: str, *, status: int, code: str | None, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(openai_error_body(message, status=status, code=code, param=param), status, headers=headers)


def _rbee_error_response(
    exc: errors.RbeeError, headers: dict[str, str] | None = None, *, chat: bool | None = None
) -> JSONResponse:
    """``chat``: the error is a chat's (True) or a completion's (False), so a prompt that does not fit
    the context is OpenAI's ``context_length_exceeded`` about ``messages`` or ``prompt``."""
    status = 400 if exc.status_code == 422 else exc.status_code
    param = None
    code = str(exc.data.get("code") or exc.kind)
    if isinstance(exc, errors.InvalidOperation):
        param = exc.field if exc.data.get("code") == "unknown_parameter" else _param_name(exc.field)
        if chat is not None and ("n_ctx" in exc.data or _over_context(exc.message)):
            code, param = _context_exceeded(exc.message, chat, param)
    elif isinstance(exc, errors.ModelNotFound):
        param = "model"
    else:
        param = exc.data.get("param")
    headers = dict(headers or {})
    if isinstance(exc, errors.QueueFull):
        headers["Retry-After"] = str(exc.retry_after_s)
    return _error_response(exc.message, status=status, code=code, param=param, headers=headers)


#: How the queen's and the worker's refusals of an input too long for the context begin or say it.
_OVER_CONTEXT = re.compile(r"exceed the context|does not fit the context|a slot holds|the context holds")


def _over_context(message: str) -> bool:
    return _OVER_CONTEXT.search(message) is not None


def _context_exceeded(message: str, chat: bool, param: str | None) -> tuple[str, str | None]:
    """OpenAI's code and param for an input too long: the prompt's field, or ``max_tokens`` when it alone is."""
    if "does not fit the context" in message and param in ("max_tokens", "max_completion_tokens", "n_predict"):
        return "context_length_exceeded", param
    return "context_length_exceeded", "messages" if chat else "prompt"


def _end_error_response(end: dict[str, Any], headers: dict[str, str], call: _Call | None = None) -> JSONResponse:
    """The answer for a job that ended unsuccessfully before its first token."""
    error = end.get("error") or {}
    kind = str(error.get("kind") or end.get("status") or "internal")
    message = str(error.get("message") or f"the job ended {end.get('status')}")
    status = _status_of(kind)
    if kind == "queue_full":
        headers = {**headers, "Retry-After": "2"}
    param = None
    code = kind
    if kind == "invalid_operation":
        # The worker's refusals start with the field they are about ("logit_bias: ...").
        named = _FIELD_PREFIX.match(message)
        if named is not None:
            param = named.group(1)
            if param in ("json_schema", "grammar") and call is not None and call.constrained_by:
                param = call.constrained_by
        if call is not None and _over_context(message):
            code, param = _context_exceeded(message, call.chat, param)
    return _error_response(message, status=status, code=code, param=param, headers=headers)


_FIELD_PREFIX = re.compile(r"([a-z_]+): ")


def _param_name(field: str | None) -> str | None:
    """``messages.0.content`` (pydantic) -> ``messages[0].content`` (OpenAI)."""
    if not field or field == "operation":
        return None
    parts = field.split(".")
    out = parts[0]
    for part in parts[1:]:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


# -- requests ----------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """One validated request: the job to run and how to answer."""

    op: Infer
    chat: bool
    model: str
    stream: bool
    include_usage: bool
    #: The body field that asked for a grammar (``response_format``, ``grammar``, ``json_schema``, ``tools``), if any.
    constrained_by: str = ""
    #: A chat's tools and tool_choice (None: a completion).
    tools: _Tools | None = None
    #: How many choices (one job each).
    n: int = 1
    #: No max_tokens was given: generate until the slot's context is full (see :func:`_to_the_context`).
    to_the_context: bool = False
    #: ``tool_choice`` auto with a model whose own template renders tools: they go to it, and
    #: its calls are parsed from the answer (:mod:`rbee.queen.toolcalls`).
    template_tools: bool = False


def _number(body: dict[str, Any], name: str, *, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        raise errors.InvalidOperation(
            f"{name} must be {'an integer' if integer else 'a number'}, not {value!r}", field=name
        )
    return value


def _refuse(param: str, why: str) -> NoReturn:
    raise errors.InvalidOperation(f"{param}: {why}", field=param)


#: The parameters of OpenAI's Completions and Chat Completions APIs rbee honours, on both.
_HONOURED = frozenset(
    {
        "model", "stream", "stream_options", "n", "response_format", "logprobs", "top_logprobs",
        "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
        "presence_penalty", "frequency_penalty", "logit_bias",
    }
)  # fmt: skip
_HONOURED_CHAT = frozenset({"messages", "tools", "tool_choice", "parallel_tool_calls"})
_HONOURED_COMPLETION = frozenset({"prompt", "suffix", "best_of", "echo"})
#: OpenAI's parameters that do not change the answer: accepted as OpenAI accepts them.
_INFORMATIONAL = frozenset({"user", "metadata", "service_tier", "prompt_cache_key", "safety_identifier", "store"})
#: llama.cpp server's own parameters that rbee honours (``keep_alive`` is Ollama's;
#: ``cache_prompt``: rbee always reuses a slot's cached prefix).
_LLAMA_CPP = frozenset({"grammar", "json_schema", "n_predict", "min_p", "repeat_penalty", "top_k", "keep_alive"})
#: The hints llama.cpp's clients (editor plugins) send that change no answer: accepted.
_INFORMATIONAL_LLAMA_CPP = frozenset(
    {"cache_prompt", "samplers", "n_indent", "t_max_prompt_ms", "t_max_predict_ms", "id_slot"}
)
#: Parameters of OpenAI's API (and of llama.cpp's) rbee cannot honour: refused by name, saying why.
_UNSUPPORTED: dict[str, str] = {
    "audio": "audio output is not supported (rbee answers text)",
    "modalities": "only [\"text\"] is supported (rbee answers text)",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "reasoning effort is not supported by rbee's models",
    "verbosity": "verbosity is not supported by rbee's models",
    "functions": "the deprecated functions are not supported: give tools (and tool_choice)",
    "function_call": "the deprecated functions are not supported: give tools (and tool_choice)",
    **{
        name: f"llama.cpp's {name} is not supported by rbee"
        for name in (
            "typical_p", "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta", "dynatemp_range",
            "dynatemp_exponent", "xtc_probability", "xtc_threshold", "dry_multiplier", "dry_base",
            "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers", "repeat_last_n",
            "penalize_nl", "ignore_eos", "n_keep", "n_probs", "return_tokens", "post_sampling_probs",
            "timings_per_token", "chat_template_kwargs", "reasoning_format", "lora", "image_data",
            "n_discard",
        )
    },
}  # fmt: skip
#: The values of those that ask for nothing (off, or what rbee does anyway): accepted.
_NOTHING_ASKED: dict[str, tuple[Any, ...]] = {
    "modalities": (["text"],),
    "typical_p": (1,),
    "tfs_z": (1,),
    "mirostat": (0,),
    "dynatemp_range": (0,),
    "xtc_probability": (0,),
    "dry_multiplier": (0,),
    "penalize_nl": (False,),
    "ignore_eos": (False,),
    "n_keep": (0,),
    "n_probs": (0,),
    "return_tokens": (False,),
    "post_sampling_probs": (False,),
    "timings_per_token": (False,),
    "lora": ([],),
    "image_data": ([],),
}
#: How a parameter's name is said in an error (any key a body may hold, kept short and printable).
_UNSAFE_NAME = re.compile(r"[^\x20-\x7e]")


def _said(name: str) -> str:
    return _UNSAFE_NAME.sub("?", name)[:64]


def _same(value: Any, off: Any) -> bool:
    """``value == off``, with booleans and numbers kept apart (``True`` is not ``1``)."""
    return isinstance(value, bool) == isinstance(off, bool) and value == off


def _refuse_unknown(body: dict[str, Any], chat: bool) -> None:
    """OpenAI's answer to a parameter it does not know: 400 ``unknown_parameter`` naming it."""
    known = _HONOURED | _INFORMATIONAL | _LLAMA_CPP | _INFORMATIONAL_LLAMA_CPP | set(_UNSUPPORTED)
    known |= _HONOURED_CHAT if chat else _HONOURED_COMPLETION
    unknown = [_said(str(k)) for k in body if k not in known]
    if unknown:
        which = "argument" if len(unknown) == 1 else "arguments"
        raise errors.InvalidOperation(
            f"Unrecognized request {which} supplied: {', '.join(unknown[:16])}",
            field=unknown[0],
            code="unknown_parameter",
        )


def _refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    """OpenAI's parameters rbee cannot honour: 400 ``unsupported_parameter`` naming each and saying why."""
    for name, why in _UNSUPPORTED.items():
        value = body.get(name)
        if value is None or any(_same(value, off) for off in _NOTHING_ASKED.get(name, ())):
            continue
        raise errors.InvalidOperation(f"{name}: {why}", field=name, code="unsupported_parameter")
    if body.get("store") not in (None, False):
        raise errors.InvalidOperation(
            "store: stored chat completions are not kept (every job is in rbee's history: GET /v1/jobs/{id})",
            field="store",
            code="unsupported_parameter",
        )
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        _refuse("metadata", "must be an object of string keys and values")
    if chat:
        return
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        _refuse("best_of", "only best_of=1 is supported")
    if body.get("echo"):
        _refuse("echo", "echo is not supported")


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives each token's log-probability comes with (None: no log-probabilities)."""
    if not chat:
        if body.get("top_logprobs") is not None:
            _refuse("top_logprobs", "completions take logprobs: 0..5 (the number of alternatives)")
        n = _number(body, "logprobs", integer=True)
        if n is not None and not 0 <= n <= COMPLETION_TOP_LOGPROBS:
            _refuse("logprobs", f"must be 0..{COMPLETION_TOP_LOGPROBS}, not {n}")
        return n
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        _refuse("logprobs", f"must be true or false, not {wanted!r}")
    top = _number(body, "top_logprobs", integer=True)
    if top is not None:
        if not wanted:
            _refuse("top_logprobs", "needs logprobs: true")
        if not 0 <= top <= CHAT_TOP_LOGPROBS:
            _refuse("top_logprobs", f"must be 0..{CHAT_TOP_LOGPROBS}, not {top}")
    return (top or 0) if wanted else None


def _logit_bias(raw: Any) -> dict[int, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        _refuse("logit_bias", "must be an object of token id -> bias (-100..100)")
    out: dict[int, float] = {}
    for key, bias in raw.items():
        if not isinstance(key, str) or not key.isdigit() or len(key) > 10:
            _refuse("logit_bias", f"{key!r} is not a token id")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            _refuse("logit_bias", f"the bias of token {key} must be a number in -100..100, not {bias!r}")
        out[int(key)] = float(bias)
    return out


def _constraint(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What the output must follow: ``(the field that asked, Infer's grammar or json_schema)``."""
    asked: list[tuple[str, dict[str, Any]]] = []
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            asked.append(("response_format", {"json_schema": {"type": "object"}}))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                _refuse("response_format", "json_schema must be an object with name, schema and strict")
            schema = spec.get("schema", {})
            if not isinstance(schema, dict):
                _refuse("response_format", "json_schema.schema must be a JSON schema (an object)")
            asked.append(("response_format", {"json_schema": schema}))
        elif kind != "text":
            _refuse("response_format", "the type must be text, json_object or json_schema")
    grammar = body.get("grammar")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            _refuse("grammar", "must be a GBNF grammar (a non-empty string)")
        asked.append(("grammar", {"grammar": grammar}))
    schema = body.get("json_schema")
    if schema is not None:
        if not isinstance(schema, dict):
            _refuse("json_schema", "must be a JSON schema (an object)")
        asked.append(("json_schema", {"json_schema": schema}))
    if len(asked) > 1:
        _refuse(asked[1][0], f"give one of response_format, grammar and json_schema, not {asked[0][0]} too")
    return asked[0] if asked else ("", {})


# -- tools -------------------------------------------------------------------

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class _Tools:
    """What a chat's ``tools`` and ``tool_choice`` ask for."""

    #: The functions (``{"name", "description", "parameters"}``), as validated.
    functions: tuple[dict[str, Any], ...] = ()
    #: ``none``, ``auto`` or ``required``, or ``function`` (the one named in ``name``).
    choice: str = "none"
    name: str = ""
    #: ``parallel_tool_calls``: more than one call may be answered.
    parallel: bool = True

    @property
    def calls(self) -> bool:
        """Whether the answer is a grammar-constrained call."""
        return self.choice in ("required", "function")

    def schema(self) -> dict[str, Any]:
        """The JSON schema of the call: ``{"name": const, "arguments": its parameters}`` for each function allowed."""
        alternatives = [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in self.functions
            if self.choice == "required" or f["name"] == self.name
        ]
        return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}

    def as_openai(self) -> list[dict[str, Any]]:
        """The functions as OpenAI's tools, for a chat template that renders them."""
        return [{"type": "function", "function": f} for f in self.functions]

    def instructions(self) -> str:
        """What the model is told about the functions (the template has no place for them)."""
        allowed = [f for f in self.functions if self.choice == "required" or f["name"] == self.name]
        listed = "\n".join(_dumps(f) for f in allowed)
        which = f"the function {self.name}" if self.choice == "function" else "one of these functions"
        return (
            f"You can call these functions:\n{listed}\n"
            f"Call {which}: answer with a JSON object with the function's name and its arguments, "
            '{"name": ..., "arguments": {...}}.'
        )


def _tools(body: dict[str, Any]) -> _Tools:
    raw = body.get("tools")
    choice = body.get("tool_choice")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        _refuse("tools", "must be a list of {type: function, function: {name, description, parameters}}")
    if len(raw) > MAX_TOOLS:
        _refuse("tools", f"at most {MAX_TOOLS} tools, not {len(raw)}")
    functions: list[dict[str, Any]] = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise errors.InvalidOperation(f"{where}.type: only function tools are supported", field=f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise errors.InvalidOperation(
                f"{where}.function must be an object with name, description and parameters", field=f"{where}.function"
            )
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise errors.InvalidOperation(
                f"{where}.function.name: {name!r} must be 1-64 letters, digits, _ or -", field=f"{where}.function.name"
            )
        if any(f["name"] == name for f in functions):
            raise errors.InvalidOperation(
                f"{where}.function.name: {name!r} is given twice", field=f"{where}.function.name"
            )
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise errors.InvalidOperation(
                f"{where}.function.parameters must be a JSON schema of an object", field=f"{where}.function.parameters"
            )
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise errors.InvalidOperation(
                f"{where}.function.description must be a string", field=f"{where}.function.description"
            )
        entry: dict[str, Any] = {"name": name, "parameters": {"type": "object", **parameters}}
        if description:
            entry["description"] = description
        functions.append(entry)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        _refuse("parallel_tool_calls", "must be true or false")
    parallel = parallel is not False
    if choice is None:
        choice = "auto" if functions else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            _refuse(
                "tool_choice", f"must be none, auto, required or {{type: function, function: {{name}}}}, not {choice!r}"
            )
        if choice == "required" and not functions:
            _refuse("tool_choice", "required needs tools")
        return _Tools(tuple(functions), choice, parallel=parallel)
    named = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = named.get("name") if isinstance(named, dict) else None
    if not isinstance(name, str):
        _refuse("tool_choice", "must be none, auto, required or {type: function, function: {name}}")
    if all(f["name"] != name for f in functions):
        _refuse("tool_choice", f"no tool is named {name!r}")
    return _Tools(tuple(functions), "function", name, parallel=parallel)


def _with_instructions(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """``text`` at the start of the system turn (a new one if the chat has none)."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def _tool_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _parse_tool_call(text: str) -> tuple[str, str] | None:
    """``(name, arguments as JSON text)`` of a generated call, or None if it is not one (cut short)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or "arguments" not in value:
        return None
    return value["name"], _dumps(value["arguments"])


class _CallStream:
    """A call streamed as OpenAI's tool-call deltas: the name once known, then the arguments' text."""

    def __init__(self) -> None:
        self.text = ""
        self.id = _tool_call_id()
        self.name: str | None = None
        self._args_at = 0
        self._sent = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The tool-call deltas ``text`` completes."""
        self.text += text
        out: list[dict[str, Any]] = []
        if self.name is None:
            head = _CALL_HEAD.match(self.text)
            if head is None:
                return out
            self.name = json.loads('"' + head.group(1) + '"')
            self._args_at = head.end()
            out.append(self._delta({"name": self.name, "arguments": ""}, first=True))
        args = self.text[self._args_at :]
        # The last "}" may be the call's own: hold it (and what follows) until the end.
        safe = args.rfind("}")
        piece = args[self._sent : safe] if safe >= 0 else args[self._sent :]
        if piece:
            self._sent += len(piece)
            out.append(self._delta({"arguments": piece}))
        return out

    def finish(self) -> list[dict[str, Any]]:
        if self.name is None:
            return []
        args = self.text[self._args_at :].rstrip()
        args = args[:-1] if args.endswith("}") else args
        piece = args[self._sent :]
        self._sent += len(piece)
        return [self._delta({"arguments": piece})] if piece else []

    def _delta(self, function: dict[str, Any], first: bool = False) -> dict[str, Any]:
        call: dict[str, Any] = {"index": 0}
        if first:
            call.update(id=self.id, type="function")
        call["function"] = function
        return call


def _text(content: Any, where: str) -> str:
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise errors.InvalidOperation(
                    f"{where}.content[{j}]: only text parts are supported", field=f"{where}.content"
                )
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise errors.InvalidOperation(
            f"{where}.content must be a string or a list of text parts", field=f"{where}.content"
        )
    return content


def _assistant_calls(raw: Any, where: str, names: dict[str, str]) -> list[str]:
    """An assistant turn's ``tool_calls`` as the JSON the model would have written (``names``: id -> name)."""
    if not isinstance(raw, list):
        raise errors.InvalidOperation(f"{where}.tool_calls must be a list", field=f"{where}.tool_calls")
    out = []
    for k, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise errors.InvalidOperation(
                f"{where}.tool_calls[{k}] must be {{id, type: function, function: {{name, arguments}}}}",
                field=f"{where}.tool_calls[{k}]",
            )
        try:
            parsed: Any = json.loads(arguments)
        except ValueError:
            parsed = arguments
        if isinstance(call.get("id"), str):
            names[call["id"]] = name
        out.append(_dumps({"name": name, "arguments": parsed}))
    return out


def _messages(raw: Any) -> list[dict[str, str]]:
    """The chat as Infer's turns (system, user, assistant).

    A tool result (``role: tool``) becomes a user turn ``Tool result (name): ...``
    (joined to the user turn before it, as templates want turns to alternate), an
    assistant's ``tool_calls`` the JSON of each call in its turn.
    """
    if not isinstance(raw, list) or not raw:
        raise errors.InvalidOperation("messages must be a non-empty list of {role, content}", field="messages")
    out: list[dict[str, str]] = []
    names: dict[str, str] = {}
    after_tool = False
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise errors.InvalidOperation(f"{where} must be an object with role and content", field=where)
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system turn
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise errors.InvalidOperation(
                f"{where}.role: {role!r} is not supported (system, developer, user, assistant, tool)",
                field=f"{where}.role",
            )
        content = message.get("content")
        if content is None and (role == "assistant" or role == "tool"):
            content = ""
        content = _text(content, where)
        if role == "assistant" and message.get("tool_calls"):
            calls = _assistant_calls(message["tool_calls"], where, names)
            content = "\n".join([content, *calls] if content else calls)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise errors.InvalidOperation(
                    f"{where}.tool_call_id: a tool result names the call it answers", field=f"{where}.tool_call_id"
                )
            name = names.get(call_id) or message.get("name") or call_id
            content = f"Tool result ({name}): {content}"
            if out and out[-1]["role"] == "user":
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + content}
                after_tool = True
                continue
            role = "user"
        elif role == "user" and after_tool and out and out[-1]["role"] == "user":
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + content}
            continue
        after_tool = message.get("role") == "tool"
        out.append({"role": role, "content": content})
    return out


def _prompt(raw: Any) -> str:
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        return raw[0]
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list) and len(raw) > 1 and all(isinstance(p, str) for p in raw):
        raise errors.InvalidOperation("prompt: one prompt per request is supported, not a batch", field="prompt")
    raise errors.InvalidOperation("prompt must be a string (token arrays are not supported)", field="prompt")


def _parse(body: Any, chat: bool) -> _Call:
    if not isinstance(body, dict):
        raise errors.InvalidOperation("the body must be a JSON object", field=None)
    _refuse_unknown(body, chat)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise errors.InvalidOperation("model is required (a model id or alias, see GET /v1/models)", field="model")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise errors.InvalidOperation("stream must be true or false", field="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise errors.InvalidOperation("stream_options must be an object", field="stream_options")
    include_usage = bool((options or {}).get("include_usage"))
    _refuse_unsupported(body, chat)
    n = _number(body, "n", integer=True)
    n = 1 if n is None else n
    if not 1 <= n <= MAX_CHOICES:
        _refuse("n", f"must be 1..{MAX_CHOICES}, not {n}")
    constrained_by, constraint = _constraint(body)
    logprobs = _logprobs(body, chat)
    max_tokens = _number(body, "max_completion_tokens", integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", integer=True)
    # llama.cpp's server: n_predict, -1 (or any negative) for "until the context is full".
    n_predict = _number(body, "n_predict", integer=True) if max_tokens is None else None
    if n_predict is not None and n_predict >= 0:
        max_tokens = n_predict
    to_the_context = max_tokens is None and (chat or n_predict is not None)
    if max_tokens is None:
        max_tokens = DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_COMPLETION_MAX_TOKENS
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    fields: dict[str, Any] = {
        "operation": "infer",
        "model": model,
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature"),
        "top_p": _number(body, "top_p"),
        "top_k": _number(body, "top_k", integer=True),
        "seed": _number(body, "seed", integer=True),
        "stop": stop,
        "min_p": _number(body, "min_p"),
        "presence_penalty": _number(body, "presence_penalty"),
        "frequency_penalty": _number(body, "frequency_penalty"),
        "repeat_penalty": _number(body, "repeat_penalty"),
        "logit_bias": _logit_bias(body.get("logit_bias")) or None,
        "logprobs": logprobs,
        **constraint,
    }
    if body.get("keep_alive") is not None:
        # Ollama's field: how long the model stays loaded after this request ("5m", 300, -1, 0).
        try:
            fields["keep_alive"] = parse_keep_alive(body["keep_alive"])
        except ValueError as exc:
            raise errors.InvalidOperation(f"keep_alive: {exc}", field="keep_alive") from None
    # OpenAI's defaults, not rbee's.
    fields["temperature"] = 1.0 if fields["temperature"] is None else fields["temperature"]
    fields["top_p"] = 1.0 if fields["top_p"] is None else fields["top_p"]
    tools = _tools(body) if chat else None
    if tools is not None and tools.calls:
        if constrained_by:
            _refuse(constrained_by, f"cannot be given with tool_choice {tools.choice} (the call is the output)")
        constrained_by = "tools"
        fields["json_schema"] = tools.schema()
    if chat:
        fields["messages"] = _messages(body.get("messages"))
        if tools is not None and tools.calls:
            fields["messages"] = _with_instructions(fields["messages"], tools.instructions())
    else:
        if "prompt" not in body:
            raise errors.InvalidOperation("prompt is required", field="prompt")
        fields["prompt"] = _prompt(body["prompt"])
        suffix = body.get("suffix")
        if suffix is not None and not isinstance(suffix, str):
            _refuse("suffix", "must be a string (the text after the insertion)")
        if suffix:  # OpenAI's default is no suffix; an empty one is none too
            fields["suffix"] = suffix
    try:
        op = parse_operation({k: v for k, v in fields.items() if v is not None})
    except errors.InvalidOperation as exc:
        if exc.field == "max_tokens" and body.get("max_completion_tokens") is not None:
            exc.field = "max_completion_tokens"  # name the field the client sent
        elif exc.field == "max_tokens" and n_predict is not None:
            exc.field = "n_predict"
        if exc.field is not None and exc.field.split(".")[0] == "json_schema" and constrained_by:
            exc.field = constrained_by
        raise
    assert isinstance(op, Infer)
    return _Call(
        op=op,
        chat=chat,
        model=model,
        stream=stream,
        include_usage=include_usage,
        constrained_by=constrained_by,
        tools=tools,
        n=n,
        to_the_context=to_the_context,
    )


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InvalidOperation(f"the body is not valid JSON: {exc}", field=None) from None


# -- the job's events ----------------------------------------------------------


async def _job_events(job: Job, *, logprobs: bool = False) -> _Events:
    """``("token", text)`` for each token (with ``logprobs``: ``(text, the token event's lp)``),
    then ``("end", end_data)``.

    The end gets ``tokens_reused`` (prompt tokens the worker's slot already held)
    from the worker's ``infer_prefix_reused`` narration when it has none.
    """
    reused = 0
    async for _id, kind, data in job.stream():
        if kind == "token":
            token = json.loads(data)
            yield "token", (token["t"], token.get("lp")) if logprobs else token["t"]
        elif kind == "narration" and '"infer_prefix_reused"' in data:
            reused = int(json.loads(data).get("tokens_reused") or 0)
        elif kind == "end":
            end = json.loads(data)
            end.setdefault("tokens_reused", reused)
            yield "end", end
            return


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Await ``work`` unless the client leaves first: ``(True, result)`` or ``(False, None)``."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        return False, None
    return True, task.result()


def _abandon(state: QueenState, job: Job) -> None:
    """The client left: cancel its job so the worker is freed."""
    if not job.done and job.cancel_reason is None:
        try:
            state.registry.cancel(job.id, "client disconnected")
        except errors.JobConflict:
            pass


async def _release(state: QueenState, job: Job, events: _Events) -> None:
    await events.aclose()
    _abandon(state, job)


def _finish_reason(end: dict[str, Any]) -> str:
    return "length" if end.get("stop_reason") == "max_tokens" else "stop"


def _usage(end: dict[str, Any], *more: dict[str, Any]) -> dict[str, Any]:
    """The usage of a job, or of ``n`` jobs of one prompt (counted once)."""
    prompt = int(end.get("tokens_in") or 0)
    completion = sum(int(e.get("tokens_out") or 0) for e in (end, *more))
    cached = min(prompt, int(end.get("tokens_reused") or 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


# -- answers -----------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class _Format:
    """The OpenAI objects of one answer (chat or text completion)."""

    def __init__(self, call: _Call, job: Job, index: int = 0) -> None:
        #: The choice this answers (``n`` > 1: one per job, all with the first job's id).
        self.index = index
        self.chat = call.chat
        self.include_usage = call.include_usage
        #: The answer is a tool call (streamed as tool-call deltas).
        self.calls = _CallStream() if call.tools is not None and call.tools.calls else None
        #: The answer may hold calls in the model's own format (``tool_choice`` auto with its template).
        self.names = [f["name"] for f in call.tools.functions] if call.template_tools and call.tools else None
        self.scanner = ToolCallScanner(self.names) if self.names is not None else None
        self._max_calls = 1 if call.tools is not None and not call.tools.parallel else MAX_TOOLS
        self._calls_sent = 0
        uid = job.id.removeprefix("job-").replace("-", "")
        self.id = f"chatcmpl-{uid}" if call.chat else f"cmpl-{uid}"
        self.created = int(job.created_at)
        self.model = call.model
        self.object = "chat.completion.chunk" if call.chat else "text_completion"
        head = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": f"rbee-{__version__}-{call.op.model}",
        }
        #: Where the next token starts in the text (a completion's ``text_offset``).
        self._offset = 0
        head_json = _dumps(head)[:-1]
        usage_tail = ',"usage":null' if self.include_usage else ""
        if call.chat:
            self._token_prefix = f'data: {head_json},"choices":[{{"index":{self.index},"delta":{{"content":'
            self._token_suffix = f'}},"logprobs":null,"finish_reason":null}}]{usage_tail}}}\n\n'
        else:
            self._token_prefix = f'data: {head_json},"choices":[{{"text":'
            self._token_suffix = f',"index":{self.index},"logprobs":null,"finish_reason":null}}]{usage_tail}}}\n\n'
        self._head = head

    # streaming

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = ...) -> bytes:
        obj = {**self._head, "choices": choices}
        if usage is not ...:
            obj["usage"] = usage
        elif self.include_usage:
            obj["usage"] = None
        return f"data: {_dumps(obj)}\n\n".encode()

    def opening(self) -> bytes | None:
        if not self.chat:
            return None
        delta = {"role": "assistant", "content": None if self.calls is not None else ""}
        return self._chunk([{"index": self.index, "delta": delta, "logprobs": None, "finish_reason": None}])

    def _call_chunks(self, deltas: list[dict[str, Any]]) -> bytes:
        return b"".join(
            self._chunk([{"index": self.index, "delta": {"tool_calls": [d]}, "logprobs": None, "finish_reason": None}])
            for d in deltas
        )

    def _scanned(self, items: list[str | ToolCall]) -> bytes:
        """The model's text as content deltas and its calls as tool-call deltas (id, type and name, then
        the arguments)."""
        out = []
        for item in items:
            if isinstance(item, str):
                if item:
                    out.append(self._content_chunk(item))
            elif self._calls_sent < self._max_calls:
                at = self._calls_sent
                self._calls_sent += 1
                head = {"index": at, "id": item.id or _tool_call_id(), "type": "function"}
                out.append(self._call_chunks([{**head, "function": {"name": item.name, "arguments": ""}}]))
                out.append(self._call_chunks([{"index": at, "function": {"arguments": item.arguments}}]))
        return b"".join(out)

    def _content_chunk(self, text: str) -> bytes:
        return (self._token_prefix + _dumps(text) + self._token_suffix).encode()

    def token(self, token: str | tuple[str, list[dict[str, Any]] | None]) -> bytes:
        text, lp = (token, None) if isinstance(token, str) else token
        if self.calls is not None:
            return self._call_chunks(self.calls.feed(text))
        if self.scanner is not None:
            return self._scanned(self.scanner.feed(text))
        if lp is None:
            return (self._token_prefix + _dumps(text) + self._token_suffix).encode()
        logprobs = self.logprobs(lp)
        if self.chat:
            return self._chunk(
                [{"index": self.index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}]
            )
        return self._chunk([{"text": text, "index": self.index, "logprobs": logprobs, "finish_reason": None}])

    def logprobs(self, lp: list[dict[str, Any]]) -> dict[str, Any]:
        """The worker's entries (OpenAI's chat shape) as this answer's ``logprobs`` object."""
        if self.chat:
            return {"content": lp, "refusal": None}
        offsets = []
        for entry in lp:
            offsets.append(self._offset)
            self._offset += len(entry["token"])
        return {
            "tokens": [e["token"] for e in lp],
            "token_logprobs": [e["logprob"] for e in lp],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in lp],
            "text_offset": offsets,
        }

    def closing(self, end: dict[str, Any]) -> bytes:
        reason = _finish_reason(end)
        if self.calls is not None:
            if self.calls.name is None:  # cut short before the name: what there is, as text
                text = self.calls.text
                head = self._chunk(
                    [{"index": self.index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]
                )
                return head + self._chunk(
                    [{"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason}]
                )
            tail = self._call_chunks(self.calls.finish())
            reason = "tool_calls" if reason == "stop" else reason
            return tail + self._chunk([{"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason}])
        if self.scanner is not None:
            tail = self._scanned(self.scanner.finish())
            reason = "tool_calls" if self._calls_sent else reason
            return tail + self._chunk([{"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason}])
        if self.chat:
            return self._chunk([{"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason}])
        return self._chunk([{"text": "", "index": self.index, "logprobs": None, "finish_reason": reason}])

    def usage(self, end: dict[str, Any], *more: dict[str, Any]) -> bytes:
        return self._chunk([], usage=_usage(end, *more))

    # not streaming

    def whole(self, text: str, end: dict[str, Any], lp: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        reason = _finish_reason(end)
        logprobs = None if lp is None else self.logprobs(lp)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            call = _parse_tool_call(text) if self.calls is not None else None
            if call is not None and self.calls is not None:
                function = {"name": call[0], "arguments": call[1]}
                tool_calls = [{"id": self.calls.id, "type": "function", "function": function}]
                message = {**message, "content": None, "tool_calls": tool_calls}
                reason = "tool_calls"
            parsed = parse_tool_calls(text, self.names) if self.names is not None else None
            if parsed is not None and parsed.calls:
                tool_calls = [
                    {
                        "id": found.id or _tool_call_id(),
                        "type": "function",
                        "function": {"name": found.name, "arguments": found.arguments},
                    }
                    for found in parsed.calls[: self._max_calls]
                ]
                message = {**message, "content": parsed.content or None, "tool_calls": tool_calls}
                reason = "tool_calls"
            choice = {"index": self.index, "message": message, "logprobs": logprobs, "finish_reason": reason}
            obj = {**self._head, "object": "chat.completion"}
        else:
            choice = {"text": text, "index": self.index, "logprobs": logprobs, "finish_reason": reason}
            obj = dict(self._head)
        return {**obj, "choices": [choice], "usage": _usage(end)}


def _error_chunk(end: dict[str, Any]) -> bytes:
    error = end.get("error") or {}
    kind = str(error.get("kind") or end.get("status") or "internal")
    message = str(error.get("message") or f"the job ended {end.get('status')}")
    body = openai_error_body(message, status=_status_of(kind), code=kind)
    return f"data: {_dumps(body)}\n\n".encode()


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping", sep="\n")


async def _stream(
    state: QueenState, job: Job, fmt: _Format, first: tuple[str, Any], events: _Events
) -> AsyncIterator[bytes]:
    try:
        opening = fmt.opening()
        if opening is not None:
            yield opening
        kind, data = first
        while kind == "token":
            chunk = fmt.token(data)
            if chunk:
                yield chunk
            kind, data = await anext(events)
        end = data
        if end.get("status") == "completed":
            yield fmt.closing(end)
            if fmt.include_usage:
                yield fmt.usage(end)
            yield _DONE
        else:
            # The failure is the last thing said: no [DONE] after it.
            yield _error_chunk(end)
    finally:
        await _release(state, job, events)


# -- endpoints -----------------------------------------------------------------


#: The request bodies' main fields (the full rules are OpenAI's; what rbee refuses is a 400 naming the field).
_SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
    "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "seed": {"type": ["integer", "null"]},
    "stream": {"type": ["boolean", "null"]},
    "keep_alive": {
        "type": ["number", "string", "null"],
        "description": "How long the model stays loaded once idle: seconds or a duration ('5m', '1h'); -1 for ever",
    },
}
_COMPLETION_BODY = {
    "type": "object",
    "required": ["prompt"],
    "properties": {"prompt": {"type": "string"}, **_SAMPLING},
}
_CHAT_BODY = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"}},
            },
        },
        **_SAMPLING,
    },
}


async def _release_all(state: QueenState, jobs: list[Job], events: list[_Events]) -> None:
    for job, job_events in zip(jobs, events, strict=True):
        await _release(state, job, job_events)


def _seeded(op: Infer, i: int) -> Infer:
    """The operation of choice ``i``: the seed + i when a seed is given."""
    if i == 0 or op.seed is None:
        return op
    return op.model_copy(update={"seed": (op.seed + i) % 2**32})


async def _submit(state: QueenState, call: _Call) -> list[Job]:
    jobs: list[Job] = []
    try:
        for i in range(call.n):
            jobs.append(await state.jobs.submit(_seeded(call.op, i)))
    except BaseException:
        for job in jobs:
            _abandon(state, job)
        raise
    return jobs


async def _count(state: QueenState, op: Infer, worker: WorkerView) -> int | None:
    """The prompt tokens of ``op`` as ``worker`` counts them (None: it did not answer)."""
    token = worker.token or state.settings.token
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    body = op.model_copy(update={"hive_id": None, "worker_id": None, "device": None}).model_dump_json()
    try:
        response = await state.http.post(
            f"{worker.report.url}/v1/tokens/count", content=body, headers=headers, timeout=COUNT_TIMEOUT_S
        )
    except httpx.HTTPError:
        return None
    if response.status_code == 422:
        error = response.json().get("error") or {}
        raise errors.InvalidOperation(
            str(error.get("message") or "the worker refused the input"), field=error.get("field")
        )
    if response.status_code != 200:
        return None
    return int(response.json()["tokens_in"])


def _renders_tools(state: QueenState, model: str) -> bool:
    """Whether ``model``'s own chat template renders tools, as a hive that has it reports."""
    for hive in state.telemetry.fresh_hives():
        ids = {model}
        for worker in hive.workers.values():
            if model in (worker.report.model, *worker.report.model_aliases):
                ids.add(worker.report.model)
        if any(m.chat_tools and (m.id in ids or m.alias == model) for m in hive.models):
            return True
    return False


def _offer_tools(state: QueenState, call: _Call) -> _Call:
    """``tool_choice`` auto: the tools go to a model whose template renders them."""
    tools = call.tools
    if tools is None or tools.choice != "auto" or not tools.functions or not _renders_tools(state, call.model):
        return call
    return replace(call, op=call.op.model_copy(update={"tools": tools.as_openai()}), template_tools=True)


async def _to_the_context(state: QueenState, call: _Call) -> _Call:
    """A call without max_tokens gets what is left of the slot's context after its prompt."""
    if not call.to_the_context:
        return call
    return replace(call, op=await to_the_context(state, call.op, "messages" if call.chat else "prompt"))


async def to_the_context(state: QueenState, op: Infer, field: str) -> Infer:
    """``op`` (asked for no limit) marked ``to_the_context`` for the worker that runs it, with the
    ``max_tokens`` that leaves it as far as the queen can tell now.

    The context is the smallest of the model's ready workers' (``n_ctx`` of their
    reports), the prompt as one of them counts it (``POST /v1/tokens/count``), or
    bounded by its bytes when none answers; a prompt that leaves no room is refused,
    naming ``field``. While no worker of the model is known (the first one is still to
    start), :data:`DEFAULT_CHAT_MAX_TOKENS` stands in and the worker that runs the job
    bounds it by its own context.
    """
    op = op.model_copy(update={"to_the_context": True})
    workers = [w for w in state.scheduler._candidates(op, set()) if w.report.n_ctx and w.report.url]
    if not workers:
        return op
    n_ctx = min(w.report.n_ctx or 0 for w in workers)
    counted = await _count(state, op, min(workers, key=lambda w: state.scheduler.inflight.get(w.worker_id, 0)))
    tokens_in = counted if counted is not None else _input_bound(op)
    room = min(n_ctx - tokens_in, LIMITS.max_tokens)
    if room < 1:
        if counted is None:
            return op  # the worker that runs it says
        raise errors.InvalidOperation(
            f"{field}: the prompt is {tokens_in} tokens; the context holds {n_ctx}, with room for no token more",
            field=field,
            tokens_in=tokens_in,
            n_ctx=n_ctx,
        )
    return op.model_copy(update={"max_tokens": room})


async def _complete(request: Request, chat: bool) -> Response:
    state = _state(request)
    failed_headers = {REQUEST_ID_HEADER: f"req_{secrets.token_hex(12)}"}
    try:
        body = await _json_body(request)
        call = _offer_tools(state, _parse(body, chat))
        call = await _to_the_context(state, call)
        jobs = await _submit(state, call)
    except errors.RbeeError as exc:
        return _rbee_error_response(exc, failed_headers, chat=chat)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    for i, job in enumerate(jobs):
        with bound(job, actor="queen"):
            choice = f" (choice {i} of {call.n})" if call.n > 1 else ""
            choices: dict[str, Any] = {"choice": i, "n": call.n} if call.n > 1 else {}
            narrate(
                "openai_request",
                f"OpenAI {path} request for {call.model}{' (streaming)' if call.stream else ''}{choice}",
                path=path,
                stream=call.stream,
                **choices,
            )
            if call.template_tools and call.tools is not None:
                narrate(
                    "openai_tools_template",
                    f"tool_choice auto: {len(call.tools.functions)} tool(s) given to the model's chat template; "
                    "its calls are read from the answer",
                    tools=[f["name"] for f in call.tools.functions],
                )
            elif call.tools is not None and call.tools.choice == "auto":
                narrate(
                    "openai_tools_auto",
                    f"tool_choice auto: answered as text ({len(call.tools.functions)} tool(s) not offered): the "
                    "model's chat template has no place for tools; give tool_choice required or a function for a call",
                    tools=[f["name"] for f in call.tools.functions],
                )
    job = jobs[0]
    headers = {JOB_ID_HEADER: job.id, REQUEST_ID_HEADER: job.id}
    if call.n > 1:
        headers[JOB_IDS_HEADER] = ",".join(j.id for j in jobs)
    fmts = [_Format(call, job, i) for i in range(call.n)]
    with_logprobs = call.op.logprobs is not None
    events = [_job_events(j, logprobs=with_logprobs) for j in jobs]
    collect = _collect_logprobs if with_logprobs else _collect
    firsts: Any
    try:
        if call.stream:
            # Wait for the first token or the end of each, so a failure before
            # any output is still answered with its status.
            present, firsts = await _unless_disconnected(request, asyncio.gather(*(anext(e) for e in events)))
        else:
            present, firsts = await _unless_disconnected(request, asyncio.gather(*(collect(e) for e in events)))
    except BaseException:
        await _release_all(state, jobs, events)
        raise
    if not present or firsts is None:
        await _release_all(state, jobs, events)
        return Response(status_code=_CLIENT_GONE, headers=headers)
    if not call.stream:
        await _release_all(state, jobs, events)  # all ended: nothing to cancel
        answers = [first if with_logprobs else (*first, None) for first in firsts]
        failed = next((end for _, end, _ in answers if end.get("status") != "completed"), None)
        if failed is not None:
            return _end_error_response(failed, headers, call)
        body = fmts[0].whole(*answers[0])
        if call.n > 1:
            body["choices"] = [fmt.whole(*answer)["choices"][0] for fmt, answer in zip(fmts, answers, strict=True)]
            body["usage"] = _usage(*(end for _, end, _ in answers))
        return JSONResponse(body, headers=headers)
    failed = next((data for kind, data in firsts if kind == "end" and data.get("status") != "completed"), None)
    if failed is not None:
        await _release_all(state, jobs, events)
        return _end_error_response(failed, headers, call)
    stream = (
        _stream(state, job, fmts[0], firsts[0], events[0])
        if call.n == 1
        else _stream_choices(state, jobs, fmts, firsts, events)
    )
    return EventSourceResponse(
        stream,
        ping=state.settings.ping_interval_s,
        ping_message_factory=_ping,
        sep="\n",
        headers={**headers, "Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        # Also when the client left before the stream's first chunk, so the
        # generator above never ran: the jobs must not go on for nobody.
        background=BackgroundTask(_release_all, state, jobs, events),
    )


async def _stream_choices(
    state: QueenState, jobs: list[Job], fmts: list[_Format], firsts: list[tuple[str, Any]], events: list[_Events]
) -> AsyncIterator[bytes]:
    """``n`` > 1: the choices' chunks interleaved as their tokens come, each with its ``index``."""
    queue: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()

    async def pump(i: int) -> None:
        kind, data = firsts[i]
        await queue.put((i, kind, data))
        while kind == "token":
            kind, data = await anext(events[i])
            await queue.put((i, kind, data))

    pumps = [asyncio.ensure_future(pump(i)) for i in range(len(jobs))]
    try:
        for fmt in fmts:
            opening = fmt.opening()
            if opening is not None:
                yield opening
        ends: dict[int, dict[str, Any]] = {}
        while len(ends) < len(jobs):
            i, kind, data = await queue.get()
            if kind == "token":
                chunk = fmts[i].token(data)
                if chunk:
                    yield chunk
            elif data.get("status") == "completed":
                ends[i] = data
                yield fmts[i].closing(data)
            else:
                # The failure is the last thing said: no [DONE] after it, the other jobs cancelled.
                yield _error_chunk(data)
                return
        if fmts[0].include_usage:
            yield fmts[0].usage(*(ends[i] for i in range(len(jobs))))
        yield _DONE
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await _release_all(state, jobs, events)


async def _collect(events: _Events) -> tuple[str, dict[str, Any]]:
    parts: list[str] = []
    async for kind, data in events:
        if kind == "token":
            parts.append(data)
        else:
            return "".join(parts), data
    raise errors.RbeeError("the job's stream ended without an end event")  # pragma: no cover


async def _collect_logprobs(events: _Events) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """:func:`_collect` of events with log-probabilities: also every token's entry, in order."""
    parts: list[str] = []
    lps: list[dict[str, Any]] = []
    async for kind, data in events:
        if kind == "token":
            parts.append(data[0])
            lps.extend(data[1] or ())
        else:
            return "".join(parts), data, lps
    raise errors.RbeeError("the job's stream ended without an end event")  # pragma: no cover


def _model_list(state: QueenState) -> list[dict[str, Any]]:
    """Every model an online hive has in its catalog or a worker of it serves."""
    entries: dict[str, dict[str, Any]] = {}

    def entry(model_id: str, created: float) -> dict[str, Any]:
        found = entries.get(model_id)
        if found is None:
            found = entries[model_id] = {
                "id": model_id,
                "object": "model",
                "created": int(created),
                "owned_by": "rbee",
                "aliases": [],
                "hives": [],
                "workers": 0,
            }
        found["created"] = min(found["created"], int(created))
        return found

    def add(found: dict[str, Any], key: str, value: str) -> None:
        if value and value != found["id"] and value not in found[key]:
            found[key].append(value)

    for hive in state.telemetry.fresh_hives():
        for model in hive.models:
            found = entry(model.id, hive.first_seen)
            if model.alias:
                add(found, "aliases", model.alias)
            if hive.hive_id not in found["hives"]:
                found["hives"].append(hive.hive_id)
        for worker in hive.workers.values():
            report = worker.report
            found = entry(report.model, hive.first_seen)
            for alias in report.model_aliases:
                add(found, "aliases", alias)
            if hive.hive_id not in found["hives"]:
                found["hives"].append(hive.hive_id)
            if report.state in ("ready", "busy"):
                found["workers"] += 1
    return sorted(entries.values(), key=lambda e: e["id"])


#: What a completion can answer besides 200 (documented in the OpenAPI schema).
_COMPLETION_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid request"},
    403: {"description": "this token may not do that"},
    404: {"description": "no such model"},
    429: {"description": "the queue is full (Retry-After)"},
    502: {"description": "the worker was lost"},
    503: {"description": "no worker can serve the model"},
    504: {"description": "the job ran past its deadline"},
}


def openai_router() -> APIRouter:
    router = APIRouter(tags=["openai"])

    @router.get("/v1/models", summary="Models the cluster can serve (OpenAI list)")
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": _model_list(_state(request))}

    @router.get(
        "/v1/models/{model:path}",
        summary="One model (OpenAI model object)",
        response_model=None,
        responses={404: {"description": "no hive has that model"}},
    )
    async def get_model(request: Request, model: str) -> dict[str, Any] | JSONResponse:
        for found in _model_list(_state(request)):
            if model == found["id"] or model in found["aliases"]:
                return found
        return _error_response(f"no hive has a model {model!r}", status=404, code="model_not_found", param="model")

    @router.post(
        "/v1/completions",
        summary="Text completion (OpenAI)",
        response_model=None,
        responses=_COMPLETION_ERRORS,
        openapi_extra=_body_schema(_COMPLETION_BODY),
    )
    async def completions(request: Request) -> Response:
        return await _complete(request, chat=False)

    @router.post(
        "/v1/chat/completions",
        summary="Chat completion (OpenAI)",
        response_model=None,
        responses=_COMPLETION_ERRORS,
        openapi_extra=_body_schema(_CHAT_BODY),
    )
    async def chat_completions(request: Request) -> Response:
        return await _complete(request, chat=True)

    return router

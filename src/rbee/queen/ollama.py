"""Ollama's API on the queen: ``/api/generate``, ``/api/chat``, ``/api/embed``, ``/api/pull``, ``/api/tags``...

Ollama clients (the ``ollama`` Python package, Open WebUI, editors) work against
the queen unchanged. Like the OpenAI endpoints (:mod:`rbee.queen.openai`), every
generation is an ordinary ``infer`` job in the queen's registry (admitted,
scheduled, queued, narrated, cancellable, kept in the history), named by the
``x-rbee-job-id`` header; the job's events are translated into Ollama's shapes:

* streaming (Ollama's default): NDJSON, one ``{"response": piece, "done": false}``
  (``{"message": {...}}`` for chats) per token, then a final object with
  ``done: true``, ``done_reason`` and the timings in nanoseconds. The response
  starts with the first token, so a failure before any output is still answered
  with its status; after that, a failure is the last line, ``{"error": "..."}``.
* ``"stream": false``: one JSON object once the job has ended.

A client that goes away cancels its job. Errors are Ollama's ``{"error": "message"}``
(400 bad input, 404 ``model 'x' not found``, 429, 502, 503 no worker...), the
edge's own refusals (401, 403, 404, 413, 415) too (:func:`rbee.http.api_family`).

``/api/generate`` without ``raw`` renders ``system`` and ``prompt`` with the
model's chat template, as Ollama does; ``raw: true`` sends the prompt as it is.
An empty prompt (or an empty ``messages``) loads the model, or unloads it with
``keep_alive: 0`` (``worker_stop_all`` for the model, as ``rbee stop`` does).
Options rbee cannot honour are refused by name with 400 rather than ignored;
those about the runtime (``num_ctx``, ``num_gpu``, ``num_thread``...) are
accepted and ignored, said in the job's narration. ``format`` (``"json"``: any JSON object, or a
JSON schema) becomes the job's ``json_schema``.

Tools (``tools`` on ``/api/chat``: OpenAI-style function definitions, as Ollama takes
them). Ollama has no ``tool_choice``: a model whose template takes tools decides
whether to call one, and Ollama refuses tools for any other model. Here a model
whose own chat template renders tools (the hive's ``chat_tools``) gets them and
decides, its calls read from its answer in its family's format
(:mod:`rbee.queen.toolcalls`). Any other model (the bundled one) is still useful
with tools: the answer is a call of one of them generated under a grammar of the
tools' schemas (``{"name", "arguments"}``, as the OpenAI route's ``required``), so
its arguments are valid against the tool's ``parameters`` -- until the last message
is a tool result, which is answered with text, so the usual loop (call, run it,
answer) ends. Calls are answered as ``message.tool_calls: [{"function": {"name",
"arguments": {...}}}]`` (arguments an object) with ``content: ""`` (the text before
them, from a tool template) and ``done_reason: "stop"``; streamed, a call arrives in
a chunk of its own once it is whole. A constrained call cut short (``num_predict``)
is answered as the text it is. In the chat, an assistant's ``tool_calls`` go back to
the template as each call's JSON, a ``role: "tool"`` message as a user turn ``Tool
result (name): ...`` (``tool_name``, else the call it answers, in order). The job's
narration says which it was (``ollama_tools``); ``/api/show`` lists ``tools`` among
the capabilities.

``/api/embed`` and ``/api/embeddings`` go to a ready worker of the model as
``/v1/embeddings`` does (:mod:`rbee.queen.tokens`), starting one first when none is
ready. ``DELETE /api/delete`` is a ``model_delete`` job on each hive that has the
model; ``/api/pull`` a ``model_download`` job (an http(s) URL to a GGUF file or an
``hf:`` source, not an Ollama name), its byte progress as Ollama's status lines.
Both need the admin token.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rbee import __version__, errors
from rbee.contracts.operations import Infer, ModelDelete, ModelDownload, parse_keep_alive, parse_operation
from rbee.http import is_admin
from rbee.jobs.job import Job
from rbee.narration import bound, narrate
from rbee.queen import toolcalls
from rbee.queen.bodies import body_schema as _body_schema
from rbee.queen.bodies import queen_state as _state
from rbee.queen.openai.errors import status_of as _status_of
from rbee.queen.state import QueenState

# tokens.py's worker selection and call (private there): a ready worker of the model, the least busy.
from rbee.queen.tokens import forward as _worker_call
from rbee.queen.tools import Tools as _Tools
from rbee.queen.tools import parse_tool_call as _parse_tool_call
from rbee.queen.tools import parse_tools as _openai_tools
from rbee.queen.tools import with_instructions as _with_instructions
from rbee.queen.translate import DEFAULT_CHAT_MAX_TOKENS, JOB_ID_HEADER, opening, to_the_context
from rbee.queen.translate import abandon as _abandon
from rbee.queen.translate import collect as _collect
from rbee.queen.translate import job_events as _job_events
from rbee.queen.translate import json_body as _json_body
from rbee.queen.translate import renders_tools as _renders_tools
from rbee.queen.translate import unless_disconnected as _unless_disconnected

__all__ = ["OLLAMA_VERSION", "ollama_router"]

#: The Ollama API version these endpoints follow (``GET /api/version``).
OLLAMA_VERSION = "0.6.0"

_NDJSON = "application/x-ndjson"
_CLIENT_GONE = 499
#: Ollama's ``expires_at`` for a model kept for ever.
_FOREVER = datetime(2318, 1, 1, tzinfo=UTC)

#: Sampling options and the Infer field each sets.
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed"}
_INTEGER_OPTIONS = {"top_k", "seed", "num_predict", "repeat_last_n", "mirostat", "num_ctx", "num_keep"}
#: Options that change the output: passed on where the Infer operation has the field,
#: otherwise accepted only at the value that changes nothing.
_NEUTRAL: dict[str, float] = {
    "min_p": 0.0,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "typical_p": 1.0,
    "tfs_z": 1.0,
    "mirostat": 0,
}
#: Options about the runtime (memory, threads, context): rbee's hives decide those.
_RUNTIME = frozenset(
    {
        "num_ctx",
        "num_keep",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "use_mmap",
        "use_mlock",
        "low_vram",
        "f16_kv",
        "vocab_only",
        "numa",
        "logits_all",
        "embedding_only",
        "rope_frequency_base",
        "rope_frequency_scale",
        "num_gqa",
        "repeat_last_n",
        "penalize_newline",
        "mirostat_eta",
        "mirostat_tau",
    }
)
#: Fields of the request (not options) refused when set, and why.
_UNSUPPORTED = {
    "images": "images are not supported",
    "template": "a custom template is not supported (rbee uses the model's chat template)",
    "suffix": "suffix (insertion) is not supported",
    "context": "context token arrays are not supported; send the conversation to /api/chat",
    "tools": "tools are for /api/chat (a chat), not /api/generate",
    "think": "thinking is not supported",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
}


# -- errors ------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    """Ollama's error object: ``{"error": "message"}``."""
    return JSONResponse({"error": message}, status, headers=headers)


def _not_found(model: str) -> str:
    return f"model '{model}' not found"


def _rbee_error(exc: errors.RbeeError, model: str | None) -> JSONResponse:
    status = 400 if exc.status_code == 422 else exc.status_code
    message = exc.message
    if isinstance(exc, errors.ModelNotFound) and model:
        message = _not_found(model)
    elif isinstance(exc, errors.InvalidOperation):
        message = _invalid_message(exc)
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, errors.QueueFull) else None
    return _error(message, status, headers)


#: Infer's field names as an Ollama request names them.
_FIELD_NAMES = {
    "max_tokens": "options.num_predict",
    "temperature": "options.temperature",
    "top_p": "options.top_p",
    "top_k": "options.top_k",
    "seed": "options.seed",
    "stop": "options.stop",
    "min_p": "options.min_p",
    "repeat_penalty": "options.repeat_penalty",
    "presence_penalty": "options.presence_penalty",
    "frequency_penalty": "options.frequency_penalty",
    "json_schema": "format",
}


def _invalid_message(exc: errors.InvalidOperation) -> str:
    problems = exc.data.get("problems")
    if not problems:
        return exc.message
    parts = []
    for problem in problems:
        name = str(problem.get("field", ""))
        head, _, rest = name.partition(".")
        name = _FIELD_NAMES.get(head, head) + (f".{rest}" if rest else "")
        parts.append(f"{name}: {problem.get('reason')}")
    return "; ".join(parts)


def _end_error(end: dict[str, Any], model: str) -> tuple[str, int]:
    error = end.get("error") or {}
    kind = str(error.get("kind") or end.get("status") or "internal")
    message = str(error.get("message") or f"the job ended {end.get('status')}")
    if kind == "model_not_found":
        message = _not_found(model)
    return message, _status_of(kind)


def _end_error_response(end: dict[str, Any], model: str, headers: dict[str, str]) -> JSONResponse:
    message, status = _end_error(end, model)
    if status == 429:
        headers = {**headers, "Retry-After": "2"}
    return _error(message, status, headers)


# -- requests ----------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """One validated request: the job to run (an Infer, or a load/unload) and how to answer."""

    chat: bool
    model: str
    stream: bool
    op: Infer | None = None
    #: For a load or unload (no input): the keep-alive asked for (0: unload).
    keep_alive: float | None = None
    ignored: list[str] = field(default_factory=list)
    #: The chat's tools (``required``: the answer is a call of one of them; ``none``: text).
    tools: _Tools | None = None

    @property
    def calling(self) -> bool:
        """The answer is a grammar-constrained tool call."""
        return self.tools is not None and self.tools.calls

    @property
    def template_tools(self) -> bool:
        """The tools went to the model's own chat template: its calls are read from its answer."""
        return self.tools is not None and self.tools.choice == "auto"


def _model_name(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        model = body.get("name")  # older clients
    if not isinstance(model, str) or not model:
        raise _Refused("model is required")
    return model


def _rbee_model(model: str) -> str:
    """Ollama's default tag: ``gemma3-270m:latest`` is rbee's ``gemma3-270m``."""
    return model.removesuffix(":latest") or model


def _keep_alive(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return parse_keep_alive(value)
    except ValueError as exc:
        # Ollama keeps a model for ever for any negative duration.
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            return -1.0
        if isinstance(value, str) and value.strip().startswith("-") and re.search(r"\d", value):
            try:
                parse_keep_alive(value.strip()[1:])
            except ValueError:
                pass
            else:
                return -1.0
        raise _Refused(f"keep_alive: {exc}") from None


def _number(name: str, value: Any) -> float | int:
    integer = name in _INTEGER_OPTIONS
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        raise _Refused(f"options.{name} must be {'an integer' if integer else 'a number'}, not {value!r}")
    return value  # type: ignore[no-any-return]


def _options(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """Infer fields from Ollama's ``options``, and the options ignored."""
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        raise _Refused("options must be an object")
    fields: dict[str, Any] = {}
    ignored: list[str] = []
    infer_fields = Infer.model_fields
    for name, value in raw.items():
        if value is None:
            continue
        if name in _SAMPLING:
            fields[_SAMPLING[name]] = _number(name, value)
        elif name == "num_predict":
            n = _number(name, value)
            if n in (-1, -2):  # Ollama: until the model stops (or the context is full)
                continue
            if n < 1:
                raise _Refused(f"options.num_predict must be at least 1, or -1 (no limit), not {n}")
            fields["max_tokens"] = n
        elif name == "stop":
            stop = [value] if isinstance(value, str) else value
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
                raise _Refused("options.stop must be a string or a list of strings")
            fields["stop"] = stop
        elif name in _NEUTRAL:
            number = _number(name, value)
            if name in infer_fields:
                fields[name] = float(number)
            elif number != _NEUTRAL[name]:
                raise _Refused(f"options.{name}: only {_NEUTRAL[name]:g} is supported")
        elif name in _RUNTIME:
            if name in _INTEGER_OPTIONS:
                _number(name, value)
            ignored.append(name)
        else:
            ignored.append(name)  # Ollama ignores options it does not know, too
    return fields, ignored


def _format(raw: Any) -> dict[str, Any]:
    """``format``: ``"json"`` or a JSON schema, as the Infer fields that ask for it."""
    if raw is None or raw == "":
        return {}
    if raw == "json":
        schema: dict[str, Any] = {"type": "object"}
    elif isinstance(raw, dict):
        schema = raw
    else:
        raise _Refused(f'format must be "json" or a JSON schema object, not {raw!r}')
    if "json_schema" not in Infer.model_fields:
        raise _Refused("format: structured output (json or a schema) is not supported by this rbee")
    return {"json_schema": schema}


def _refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    for name, why in _UNSUPPORTED.items():
        if chat and name == "tools":
            continue
        value = body.get(name)
        if value not in (None, False, "", [], {}, 0):
            raise _Refused(f"{name}: {why}")


def _assistant_calls(raw: Any, where: str) -> tuple[list[str], list[str]]:
    """An assistant's ``tool_calls`` as the JSON the model would have written, and the tools' names."""
    if not isinstance(raw, list):
        raise _Refused(f"{where}.tool_calls must be a list of {{function: {{name, arguments}}}}")
    calls, names = [], []
    for k, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise _Refused(f"{where}.tool_calls[{k}] must be {{function: {{name, arguments}}}}")
        assert isinstance(function, dict)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):  # some clients send OpenAI's JSON text
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        calls.append(_dumps({"name": name, "arguments": arguments}))
        names.append(name)
    return calls, names


def _messages(raw: Any) -> list[dict[str, str]]:
    """The chat as Infer's turns (system, user, assistant), as the OpenAI route renders tools.

    An assistant's ``tool_calls`` become the JSON of each call in its turn; a tool
    result (``role: tool``) a user turn ``Tool result (name): ...``, joined to the user
    turn before it (templates want turns to alternate). The tool is ``tool_name`` (or
    ``name``), else the call of the assistant turn before that it answers, in order.
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _Refused("messages must be a list of {role, content}")
    out: list[dict[str, str]] = []
    pending: list[str] = []  # the names of the last assistant turn's calls not answered yet
    after_tool = False
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _Refused(f"{where} must be an object with role and content")
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise _Refused(f"{where}.role: {role!r} is not supported (system, user, assistant, tool)")
        if message.get("images"):
            raise _Refused(f"{where}.images: images are not supported")
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _Refused(f"{where}.content must be a string")
        if message.get("tool_calls"):
            if role != "assistant":
                raise _Refused(f"{where}.tool_calls: only an assistant's message has tool calls")
            calls, pending = _assistant_calls(message["tool_calls"], where)
            content = "\n".join([content, *calls] if content else calls)
        if role == "tool":
            name = message.get("tool_name") or message.get("name")
            if name is not None and not isinstance(name, str):
                raise _Refused(f"{where}.tool_name must be a string")
            if name in pending:
                pending.remove(name)
            elif name is None:
                name = pending.pop(0) if pending else "tool"
            content = f"Tool result ({name}): {content}"
            role = "user"
            if out and out[-1]["role"] == "user":
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + content}
                after_tool = True
                continue
        elif role == "user" and after_tool and out and out[-1]["role"] == "user":
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + content}
            continue
        after_tool = message.get("role") == "tool"
        out.append({"role": role, "content": content})
    return out


def _tools(body: dict[str, Any], template: bool) -> _Tools | None:
    """The chat's ``tools`` (None: none given).

    Ollama has no ``tool_choice``: a model whose template takes tools decides for
    itself. So does one here whose own chat template renders them (``template``):
    choice ``auto``, the tools go to the template. For any other model a chat with
    tools is answered with a grammar-constrained call (choice ``required``: its
    arguments valid against the tool's parameters) -- and, once the last message
    is a tool result, with text (``none``), so the usual loop (call, result,
    answer) ends.
    """
    raw = body.get("tools")
    if raw in (None, []):
        return None
    tools = _openai_tools({"tools": raw, "tool_choice": "required"})
    if template:
        return _Tools(tools.functions, "auto")
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    answered = isinstance(last, dict) and last.get("role") == "tool"
    return _Tools(tools.functions, "none") if answered else tools


def _parse(body: Any, chat: bool, *, template_tools: bool = False) -> _Call:
    """``template_tools``: the model's own chat template renders tools (:func:`_tools`)."""
    if not isinstance(body, dict):
        raise _Refused("the body must be a JSON object")
    model = _model_name(body)
    stream = body.get("stream")
    stream = True if stream is None else stream
    if not isinstance(stream, bool):
        raise _Refused("stream must be true or false")
    _refuse_unsupported(body, chat)
    keep_alive = _keep_alive(body.get("keep_alive"))
    fields, ignored = _options(body.get("options"))
    fields.update(_format(body.get("format")))
    tools = None
    if chat:
        messages = _messages(body.get("messages"))
        if not messages:
            return _Call(chat=chat, model=model, stream=stream, keep_alive=keep_alive, ignored=ignored)
        tools = _tools(body, template_tools)
        if tools is not None and tools.choice == "auto":
            fields["tools"] = tools.as_openai()
        elif tools is not None and tools.calls:
            if "json_schema" in fields:
                raise _Refused("format: cannot be given with tools (the answer is a call of one of them)")
            # The call is the answer: generated under its schema, the tools told in the system turn.
            messages = _with_instructions(messages, tools.instructions())
            fields["json_schema"] = tools.schema()
        fields["messages"] = messages
    else:
        prompt = body.get("prompt")
        system = body.get("system")
        raw = body.get("raw") or False
        if prompt is not None and not isinstance(prompt, str):
            raise _Refused("prompt must be a string")
        if system is not None and not isinstance(system, str):
            raise _Refused("system must be a string")
        if not isinstance(raw, bool):
            raise _Refused("raw must be true or false")
        if not prompt and not system:
            return _Call(chat=chat, model=model, stream=stream, keep_alive=keep_alive, ignored=ignored)
        if raw:
            fields["prompt"] = prompt or ""
        else:
            # Ollama renders the prompt with the model's template: one user turn, after the system one.
            turns = [{"role": "system", "content": system}] if system else []
            fields["messages"] = [*turns, {"role": "user", "content": prompt or ""}]
    if "max_tokens" not in fields:  # Ollama's default: until the model stops or the context is full
        fields["max_tokens"] = DEFAULT_CHAT_MAX_TOKENS
        fields["to_the_context"] = True
    wire = {"operation": "infer", "model": _rbee_model(model), **fields}
    if keep_alive is not None:
        wire["keep_alive"] = keep_alive
    try:
        op = parse_operation(wire)
    except errors.InvalidOperation as exc:
        if tools is not None and tools.calls and (exc.field or "").split(".")[0] == "json_schema":
            raise _Refused(f"tools: {exc.message}") from None  # the call's schema is the tools'
        raise
    assert isinstance(op, Infer)
    return _Call(chat=chat, model=model, stream=stream, op=op, keep_alive=keep_alive, ignored=ignored, tools=tools)


# -- answers -----------------------------------------------------------------


def _now() -> str:
    return _iso(time.time())


def _iso(when: float | datetime) -> str:
    moment = when if isinstance(when, datetime) else datetime.fromtimestamp(when, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _ns(ms: Any) -> int:
    return int(float(ms) * 1_000_000) if isinstance(ms, int | float) and not isinstance(ms, bool) else 0


def _stats(end: dict[str, Any]) -> dict[str, Any]:
    """The final object's fields from the job's end: counts, and durations in nanoseconds."""
    total = float(end.get("duration_ms") or 0.0)
    worker = end.get("worker_wall_ms")
    # The time before the worker had the job: queueing, and starting a worker (the load).
    load = max(0.0, total - float(worker)) if isinstance(worker, int | float) else 0.0
    return {
        "done_reason": "length" if end.get("stop_reason") == "max_tokens" else "stop",
        "total_duration": _ns(total),
        "load_duration": _ns(load),
        "prompt_eval_count": int(end.get("tokens_in") or 0),
        "prompt_eval_duration": _ns(end.get("worker_ttft_ms")),
        "eval_count": int(end.get("tokens_out") or 0),
        "eval_duration": _ns(end.get("decode_ms")),
    }


class _Format:
    """The Ollama objects of one answer (generate or chat)."""

    def __init__(self, call: _Call) -> None:
        self.chat = call.chat
        self.model = call.model
        #: The answer is a tool call: the tokens are held and the call said once it is whole.
        self.calling = call.calling
        #: The tools the model's own template was given (its calls are read from the answer), else None.
        self.names = [f["name"] for f in call.tools.functions] if call.template_tools and call.tools else None

    def _head(self) -> dict[str, Any]:
        return {"model": self.model, "created_at": _now()}

    def _body(self, text: str) -> dict[str, Any]:
        if self.chat:
            return {"message": {"role": "assistant", "content": text}}
        return {"response": text}

    def piece(self, text: str) -> bytes:
        return (_dumps({**self._head(), **self._body(text), "done": False}) + "\n").encode()

    def scanner(self) -> toolcalls.ToolCallScanner | None:
        """What reads the model's own calls from a streamed answer (None: no tools went to its template)."""
        return None if self.names is None else toolcalls.ToolCallScanner(self.names)

    @staticmethod
    def call_of(found: toolcalls.ToolCall) -> dict[str, Any]:
        return {"function": {"name": found.name, "arguments": json.loads(found.arguments)}}

    def tool_calls(self, text: str) -> list[dict[str, Any]] | None:
        """Ollama's ``tool_calls`` (arguments an object) of a generated call, or None if it is not a whole one."""
        call = _parse_tool_call(text) if self.calling else None
        if call is None:
            return None
        arguments = json.loads(call[1])
        if not isinstance(arguments, dict):
            return None
        return [{"function": {"name": call[0], "arguments": arguments}}]

    def called(self, calls: list[dict[str, Any]]) -> bytes:
        """The streamed chunk that says the call."""
        message = {"role": "assistant", "content": "", "tool_calls": calls}
        return _line({**self._head(), "message": message, "done": False})

    def final(self, end: dict[str, Any], text: str = "") -> dict[str, Any]:
        if self.names is not None:
            parsed = toolcalls.parse(text, self.names)
            if parsed.calls:
                found = [self.call_of(c) for c in parsed.calls]
                message = {"role": "assistant", "content": parsed.content, "tool_calls": found}
                return {**self._head(), "message": message, "done": True, **_stats(end), "done_reason": "stop"}
        calls = self.tool_calls(text)
        if calls is not None:
            body = {"message": {"role": "assistant", "content": "", "tool_calls": calls}}
            return {**self._head(), **body, "done": True, **_stats(end), "done_reason": "stop"}
        return {**self._head(), **self._body(text), "done": True, **_stats(end)}

    def lifecycle(self, reason: str) -> dict[str, Any]:
        return {**self._head(), **self._body(""), "done": True, "done_reason": reason}


def _line(value: dict[str, Any]) -> bytes:
    return (_dumps(value) + "\n").encode()


# -- endpoints ---------------------------------------------------------------


async def _watch(request: Request, state: QueenState, job: Job) -> None:
    """Cancel the job when the client leaves (the response's whole life)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    _abandon(state, job)


async def _stream(
    state: QueenState, job: Job, fmt: _Format, first: tuple[str, Any], events: Any, watch: asyncio.Task[None]
) -> AsyncIterator[bytes]:
    try:
        kind, data = first
        held: list[str] = []  # a call's tokens, said once it is whole
        scanner = fmt.scanner()
        called = False
        while kind == "token":
            if fmt.calling:
                held.append(data)
            elif scanner is not None:
                for item in scanner.feed(data):
                    called = called or not isinstance(item, str)
                    yield fmt.piece(item) if isinstance(item, str) else fmt.called([fmt.call_of(item)])
            else:
                yield fmt.piece(data)
            kind, data = await anext(events)
        if data.get("status") == "completed" and scanner is not None:
            for item in scanner.finish():
                called = called or not isinstance(item, str)
                yield fmt.piece(item) if isinstance(item, str) else fmt.called([fmt.call_of(item)])
            yield _line({**fmt.final(data), **({"done_reason": "stop"} if called else {})})
        elif data.get("status") == "completed":
            text = "".join(held)
            calls = fmt.tool_calls(text)
            if calls is not None:
                yield fmt.called(calls)
                yield _line({**fmt.final(data), "done_reason": "stop"})
            else:
                if text:  # a call cut short: what there is, as text
                    yield fmt.piece(text)
                yield _line(fmt.final(data))
        else:
            # The failure is the last line.
            yield _line({"error": _end_error(data, fmt.model)[0]})
    finally:
        watch.cancel()
        _abandon(state, job)
        await events.aclose()


async def _submit(request: Request, state: QueenState, op: Any, call: _Call, path: str) -> Job:
    job = await state.jobs.submit(op)
    with bound(job, actor="queen"):
        narrate(
            "ollama_request",
            f"Ollama {path} request for {call.model}{' (streaming)' if call.stream and call.op else ''}",
            path=path,
            stream=call.stream,
        )
        if call.tools is not None:
            names = [f["name"] for f in call.tools.functions]
            why = "answered as text: the last message is a tool result"
            if call.template_tools:
                why = "given to the model's chat template; its calls are read from the answer"
            elif call.calling:
                why = (
                    "the answer is a call of one of them (Ollama has no tool_choice; the model's template has no "
                    "place for tools, so the call is constrained to their schemas)"
                )
            narrate("ollama_tools", f"{len(names)} tool(s) given: {why}", tools=names, call=call.calling)
        if call.ignored:
            narrate(
                "ollama_options_ignored",
                f"Ignored option(s) {', '.join(sorted(call.ignored))}: rbee's hives decide the runtime",
                options=sorted(call.ignored),
            )
    return job


async def _lifecycle(request: Request, state: QueenState, call: _Call, path: str) -> Response:
    """An empty prompt: load the model (a one-token job), or unload it with ``keep_alive: 0``."""
    model = _rbee_model(call.model)
    unload = call.keep_alive == 0
    wire: dict[str, Any] = {"operation": "worker_stop_all", "model": model}
    if not unload:
        wire = {"operation": "infer", "model": model, "prompt": "", "max_tokens": 1}
        if call.keep_alive is not None:
            wire["keep_alive"] = call.keep_alive
    op = parse_operation(wire)
    job = await _submit(request, state, op, call, path)
    headers = {JOB_ID_HEADER: job.id}
    events = _job_events(job)
    try:
        present, outcome = await _unless_disconnected(request, _collect(events))
    finally:
        await events.aclose()
    if not present or outcome is None:
        _abandon(state, job)
        return Response(status_code=_CLIENT_GONE, headers=headers)
    _, end = outcome
    if end.get("status") != "completed":
        return _end_error_response(end, call.model, headers)
    body = _Format(call).lifecycle("unload" if unload else "load")
    if call.stream:
        return Response(_line(body), media_type=_NDJSON, headers=headers)
    return JSONResponse(body, headers=headers)


async def _generate(request: Request, chat: bool) -> Response:
    state = _state(request)
    path = "/api/chat" if chat else "/api/generate"
    model: str | None = None
    try:
        body = await _json_body(request)
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            model = body["model"]
        renders = chat and model is not None and _renders_tools(state, _rbee_model(model))
        call = _parse(body, chat, template_tools=renders)
        if call.op is None:
            return await _lifecycle(request, state, call, path)
        if call.op.to_the_context:
            named = "messages" if call.op.messages is not None else "prompt"
            call = replace(call, op=await to_the_context(state, call.op, named))
        assert call.op is not None
        job = await _submit(request, state, call.op, call, path)
    except _Refused as exc:
        return _error(exc.message, exc.status)
    except errors.PayloadTooLarge:
        raise  # the edge's answer, in its shape
    except errors.RbeeError as exc:
        return _rbee_error(exc, model)
    headers = {JOB_ID_HEADER: job.id}
    fmt = _Format(call)
    events = _job_events(job)
    # The first token or the end: a failure before any output still gets its status.
    first = await opening(request, state, job, events, stream=call.stream)
    if first is None:
        return Response(status_code=_CLIENT_GONE, headers=headers)
    if not call.stream:
        await events.aclose()
        text, end = first
        if end.get("status") != "completed":
            return _end_error_response(end, call.model, headers)
        return JSONResponse(fmt.final(end, text), headers=headers)
    kind, data = first
    if kind == "end" and data.get("status") != "completed":
        await events.aclose()
        return _end_error_response(data, call.model, headers)
    watch = asyncio.get_running_loop().create_task(_watch(request, state, job), name=f"ollama:watch:{job.id}")
    return StreamingResponse(
        _stream(state, job, fmt, first, events, watch),
        media_type=_NDJSON,
        headers={**headers, "Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# -- models ------------------------------------------------------------------


def _parameter_size(name: str) -> str:
    """``gemma-3-270m-q4_k_m`` -> ``270M``: the size its name says (hives do not report a count)."""
    match = re.search(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([mMbB])(?![A-Za-z])", name)
    return f"{match.group(1)}{match.group(2).upper()}" if match else ""


def _digest(model_id: str) -> str:
    """A stable identity for a model (hives report no file hash): the SHA-256 of its id."""
    return hashlib.sha256(model_id.encode()).hexdigest()


@dataclass
class _Model:
    id: str
    name: str
    created: float
    size: int = 0
    architecture: str | None = None
    quantization: str | None = None
    context_length: int | None = None
    chat_template: str | None = None
    hives: list[str] = field(default_factory=list)

    def names(self) -> set[str]:
        return {self.id, self.name}

    def details(self) -> dict[str, Any]:
        family = self.architecture or ""
        return {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family] if family else None,
            "parameter_size": _parameter_size(self.id) or _parameter_size(self.name),
            "quantization_level": (self.quantization or "").upper(),
        }

    def tag(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": _iso(self.created),
            "size": self.size,
            "digest": _digest(self.id),
            "details": self.details(),
        }


def _models(state: QueenState) -> list[_Model]:
    """Every model an online hive has in its catalog or a worker of it serves."""
    found: dict[str, _Model] = {}
    for hive in state.telemetry.fresh_hives():
        for report in hive.models:
            model = found.get(report.id)
            if model is None:
                model = found[report.id] = _Model(id=report.id, name=report.alias or report.id, created=hive.first_seen)
            model.created = min(model.created, hive.first_seen)
            model.size = model.size or int(report.size_bytes or 0)
            model.architecture = model.architecture or report.architecture
            model.quantization = model.quantization or report.quantization
            model.context_length = model.context_length or report.context_length
            model.chat_template = model.chat_template or report.chat_template
            if hive.hive_id not in model.hives:
                model.hives.append(hive.hive_id)
        for worker in hive.workers.values():
            w = worker.report
            if w.model not in found:
                alias = w.model_aliases[0] if w.model_aliases else w.model
                found[w.model] = _Model(id=w.model, name=alias, created=hive.first_seen, hives=[hive.hive_id])
    return sorted(found.values(), key=lambda m: m.name)


def _find(state: QueenState, name: str) -> _Model | None:
    wanted = _rbee_model(name)
    return next((m for m in _models(state) if wanted in m.names() or name in m.names()), None)


def _show(model: _Model) -> dict[str, Any]:
    arch = model.architecture or "unknown"
    info: dict[str, Any] = {"general.architecture": arch, "general.name": model.id}
    if model.context_length:
        info[f"{arch}.context_length"] = model.context_length
    return {
        "modelfile": f"# rbee serves {model.id}\nFROM {model.id}\n",
        "parameters": "",
        # The chat template rbee renders chats with (its name: the model's own, "gguf", or a family's).
        "template": model.chat_template or "",
        "details": model.details(),
        "model_info": info,
        # Tools: every model's answer can be a (grammar-constrained) call.
        "capabilities": ["completion", "tools"],
        "modified_at": _iso(model.created),
        "context_length": model.context_length,
        "chat_template": model.chat_template,
        "hives": model.hives,
    }


def _expires_at(keep_alive_s: float | None, unloads_at: float | None) -> str:
    if unloads_at is not None:
        return _iso(unloads_at)
    if keep_alive_s is not None and keep_alive_s < 0:
        return _iso(_FOREVER)
    # Busy (the countdown starts when it is idle again): the keep-alive from now.
    return _iso(time.time() + (keep_alive_s if keep_alive_s is not None else 300.0))


def _ps(state: QueenState) -> list[dict[str, Any]]:
    models = {m.id: m for m in _models(state)}
    out = []
    for hive in state.telemetry.fresh_hives():
        for worker in hive.workers.values():
            w = worker.report
            if w.state not in ("starting", "ready", "busy"):
                continue
            model = models.get(w.model) or _Model(id=w.model, name=w.model, created=hive.first_seen)
            size = int(w.memory_bytes or model.size or 0)
            out.append(
                {
                    "name": model.name,
                    "model": model.name,
                    "size": size,
                    "digest": _digest(model.id),
                    "details": model.details(),
                    "expires_at": _expires_at(w.keep_alive_s, w.unloads_at),
                    "size_vram": size if w.device.startswith("cuda") else 0,
                    "context_length": w.n_ctx or model.context_length,
                    "hive_id": hive.hive_id,
                    "worker_id": w.worker_id,
                    "device": w.device,
                    "state": w.state,
                }
            )
    return sorted(out, key=lambda m: (m["name"], m["hive_id"], m["worker_id"]))


# -- embeddings, delete, pull ------------------------------------------------


def _body_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _Refused("the body must be a JSON object")
    return body


async def _load(request: Request, state: QueenState, model: str, keep_alive: float | None) -> None:
    """Start a worker of ``model`` (a one-token job, as an empty generate does)."""
    wire: dict[str, Any] = {"operation": "infer", "model": model, "prompt": "", "max_tokens": 1}
    if keep_alive is not None:
        wire["keep_alive"] = keep_alive
    job = await state.jobs.submit(parse_operation(wire))
    events = _job_events(job)
    try:
        present, outcome = await _unless_disconnected(request, _collect(events))
    finally:
        await events.aclose()
    if not present or outcome is None:
        _abandon(state, job)
        raise _Refused("the client left", _CLIENT_GONE)
    end = outcome[1]
    if end.get("status") != "completed":
        message, status = _end_error(end, model)
        raise _Refused(message, status)


async def _embed_vectors(
    request: Request, body: dict[str, Any], inputs: list[str]
) -> tuple[str, dict[str, Any], float, float]:
    """The worker's answer for ``inputs``, starting a worker of the model when none is ready (Ollama loads it)."""
    state = _state(request)
    name = _model_name(body)
    model = _rbee_model(name)
    keep_alive = _keep_alive(body.get("keep_alive"))
    started = time.perf_counter()
    payload = {"input": inputs, "dimensions": None}
    load = 0.0
    try:
        answer = await _worker_call(state, model, "/v1/embeddings", payload, "computing embeddings")
    except errors.NoWorkerAvailable:
        await _load(request, state, model, keep_alive)
        load = time.perf_counter() - started
        answer = await _worker_call(state, model, "/v1/embeddings", payload, "computing embeddings")
    return name, answer, time.perf_counter() - started, load


def _embed_inputs(raw: Any) -> list[str]:
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(x, str) for x in raw):
        raise _Refused("input must be a string or a non-empty list of strings")
    return list(raw)


async def _embed(request: Request, legacy: bool) -> Response:
    model: str | None = None
    try:
        body = _body_object(await _json_body(request))
        if isinstance(body.get("model"), str):
            model = body["model"]
        if legacy:
            prompt = body.get("prompt")
            if prompt is not None and not isinstance(prompt, str):
                raise _Refused("prompt must be a string")
            _model_name(body)
            if not prompt:
                return JSONResponse({"embedding": []})
            inputs = [prompt]
        else:
            if "input" not in body:
                raise _Refused("input is required")
            inputs = _embed_inputs(body["input"])
            truncate = body.get("truncate")
            if truncate is not None and not isinstance(truncate, bool):
                raise _Refused("truncate must be true or false")
        name, answer, total, load = await _embed_vectors(request, body, inputs)
    except _Refused as exc:
        return _error(exc.message, exc.status)
    except errors.PayloadTooLarge:
        raise
    except errors.RbeeError as exc:
        return _rbee_error(exc, model)
    vectors = answer["data"]
    if legacy:
        return JSONResponse({"embedding": vectors[0]})
    return JSONResponse(
        {
            "model": name,
            "embeddings": vectors,
            "total_duration": int(total * 1e9),
            "load_duration": int(load * 1e9),
            "prompt_eval_count": int(answer.get("prompt_tokens") or 0),
        }
    )


async def _run_job(request: Request, state: QueenState, job: Job, name: str) -> Response | None:
    """Wait for a job's end: None when it completed, else the Ollama error (or 499: the client left)."""
    events = _job_events(job)
    try:
        present, outcome = await _unless_disconnected(request, _collect(events))
    finally:
        await events.aclose()
    if not present or outcome is None:
        _abandon(state, job)
        return Response(status_code=_CLIENT_GONE, headers={JOB_ID_HEADER: job.id})
    end = outcome[1]
    if end.get("status") != "completed":
        return _end_error_response(end, name, {JOB_ID_HEADER: job.id})
    return None


async def _delete(request: Request) -> Response:
    state = _state(request)
    name: str | None = None
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    length = request.headers.get("content-length")
    has_body = length.strip() not in ("", "0") if length is not None else "transfer-encoding" in request.headers
    if has_body and kind != "application/json":
        # The edge checks the bodies of POSTs; a DELETE's is checked here, in Ollama's shape as the edge's are.
        return _error(f"the body must be application/json, not {kind or 'none'}", 415)
    try:
        body = _body_object(await _json_body(request))
        name = _model_name(body)
        if not is_admin():
            return _error("deleting a model changes the cluster for everyone; it needs the admin token", 403)
        model = _find(state, name)
        if model is None:
            return _error(_not_found(name), 404)
        hives = [h.hive_id for h in state.telemetry.fresh_hives() if h.has_model(model.id)]
        if not hives:
            return _error(_not_found(name), 404)
        for hive_id in hives:
            job = await state.jobs.submit(ModelDelete(model=model.id, hive_id=hive_id))
            refused = await _run_job(request, state, job, name)
            if refused is not None:
                return refused
    except _Refused as exc:
        return _error(exc.message, exc.status)
    except errors.PayloadTooLarge:
        raise
    except errors.RbeeError as exc:
        return _rbee_error(exc, name)
    return Response(status_code=200)


_SOURCE = re.compile(r"^(https?://\S+|hf:\S+)$", re.IGNORECASE)


def _pull_hive(state: QueenState, body: dict[str, Any]) -> str:
    """The hive to download to: ``hive_id`` when given, else the local hive, else the only online one."""
    wanted = body.get("hive_id")
    if wanted is not None:
        if not isinstance(wanted, str) or not wanted:
            raise _Refused("hive_id must be a hive's id")
        return wanted
    online = sorted(h.hive_id for h in state.telemetry.fresh_hives())
    if "localhost" in online or not online:
        return "localhost"
    if len(online) == 1:
        return online[0]
    raise _Refused(f"several hives are online ({', '.join(online)}); name one with hive_id")


def _pull_line(kind: str, data: dict[str, Any], source: str) -> dict[str, Any] | None:
    if kind != "progress" or data.get("action") != "model_download" or data.get("unit") != "bytes":
        return None
    line: dict[str, Any] = {"status": "downloading", "digest": f"sha256:{_digest(source)}"}
    if isinstance(data.get("total"), int | float):
        line["total"] = int(data["total"])
    line["completed"] = int(data.get("done") or 0)
    return line


async def _pull_events(job: Job) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
    async for _id, kind, data in job.stream():
        if kind in ("progress", "end"):
            yield kind, json.loads(data)


_PULL_DONE = [{"status": "verifying sha256 digest"}, {"status": "success"}]


async def _pull(request: Request) -> Response:
    state = _state(request)
    source: str | None = None
    try:
        body = _body_object(await _json_body(request))
        source = _model_name(body)
        stream = body.get("stream")
        stream = True if stream is None else stream
        if not isinstance(stream, bool):
            raise _Refused("stream must be true or false")
        if not _SOURCE.match(source):
            raise _Refused(
                f"rbee pulls GGUF files: an http(s) URL to a .gguf file or an hf: source (hf:org/repo/file.gguf),"
                f" not an Ollama model name such as {source!r}"
            )
        hive_id = _pull_hive(state, body)
        try:
            op = ModelDownload(source=source, hive_id=hive_id)
        except ValueError as exc:
            raise _Refused(f"model: {exc}") from None
        job = await state.jobs.submit(op)
    except _Refused as exc:
        return _error(exc.message, exc.status)
    except errors.PayloadTooLarge:
        raise
    except errors.RbeeError as exc:
        return _rbee_error(exc, source)
    assert source is not None
    headers = {JOB_ID_HEADER: job.id}
    if not stream:
        refused = await _run_job(request, state, job, source)
        return refused or JSONResponse({"status": "success"}, headers=headers)
    events = _pull_events(job)
    # The first progress or the end: a failure before any byte still gets its status.
    first = await opening(request, state, job, events, stream=True)
    if first is None:
        return Response(status_code=_CLIENT_GONE, headers=headers)
    if first[0] == "end" and first[1].get("status") != "completed":
        await events.aclose()
        return _end_error_response(first[1], source, headers)
    watch = asyncio.get_running_loop().create_task(_watch(request, state, job), name=f"ollama:pull:{job.id}")

    async def lines() -> AsyncIterator[bytes]:
        assert source is not None
        try:
            yield _line({"status": "pulling manifest"})
            kind, data = first
            while kind != "end":
                line = _pull_line(kind, data, source)
                if line is not None:
                    yield _line(line)
                kind, data = await anext(events)
            if data.get("status") == "completed":
                for done in _PULL_DONE:
                    yield _line(done)
            else:
                yield _line({"error": _end_error(data, source)[0]})
        finally:
            watch.cancel()
            _abandon(state, job)
            await events.aclose()

    return StreamingResponse(
        lines(), media_type=_NDJSON, headers={**headers, "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


# -- the OpenAPI description ---------------------------------------------------

#: Ollama's error object (the edge's component, :data:`rbee.http.OLLAMA_ERROR_SCHEMA`).
_ERROR_SCHEMA = {"$ref": "#/components/schemas/OllamaError"}
_OPTIONS_SCHEMA = {
    "type": ["object", "null"],
    "description": "temperature, top_p, top_k, seed, num_predict, stop; runtime options (num_ctx...) are ignored",
    "properties": {
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0},
        "seed": {"type": "integer", "minimum": 0},
        "num_predict": {"type": "integer"},
        "stop": {"type": ["string", "array"], "items": {"type": "string"}},
    },
}
_COMMON = {
    "model": {"type": "string", "description": "a model id or alias (GET /api/tags)"},
    "stream": {"type": ["boolean", "null"], "description": "NDJSON, one object per token (default true)"},
    "options": _OPTIONS_SCHEMA,
    "keep_alive": {
        "type": ["number", "string", "null"],
        "description": "How long the model stays loaded once idle: seconds or a duration ('5m'); negative: for ever",
    },
    "format": {"description": '"json" or a JSON schema the answer must follow'},
}
_GENERATE_BODY = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "prompt": {"type": "string", "description": "empty: load the model (keep_alive 0: unload it)"},
        "system": {"type": "string"},
        "raw": {"type": "boolean", "description": "the prompt as it is, without the chat template"},
        **_COMMON,
    },
}
_TOOL_CALL = {
    "type": "object",
    "required": ["function"],
    "properties": {
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1}, "arguments": {"type": "object"}},
        }
    },
}
_TOOL = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "description": {"type": "string"},
                "parameters": {"type": "object", "properties": {"type": {"const": "object"}}},
            },
        },
    },
}
_CHAT_BODY = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "messages": {
            "type": "array",
            "description": "empty: load the model (keep_alive 0: unload it)",
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"enum": ["system", "user", "assistant", "tool"]},
                    "content": {"type": "string"},
                    "tool_calls": {"type": "array", "items": _TOOL_CALL},
                    "tool_name": {"type": "string", "description": "the tool a tool message answers"},
                },
            },
        },
        "tools": {
            "type": "array",
            "description": "functions; the answer is a call of one of them unless the last message is a tool result",
            "items": _TOOL,
        },
        **_COMMON,
    },
}
_SHOW_BODY = {"type": "object", "required": ["model"], "properties": {"model": {"type": "string"}}}


def _errors(statuses: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    content = {"application/json": {"schema": _ERROR_SCHEMA}}
    return {status: {"description": why, "content": content} for status, why in statuses.items()}


_GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "NDJSON objects (stream) or one object (stream: false)",
        "content": {_NDJSON: {}, "application/json": {}},
    },
    **_errors(
        {
            400: "invalid request",
            403: "this token may not do that (unloading needs the admin token)",
            404: "no such model",
            409: "a hive of the model is offline",
            429: "the queue is full (Retry-After)",
            502: "the worker was lost",
            503: "no worker can serve the model",
            504: "the job ran past its deadline",
        }
    ),
}

_EMBED_BODY = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": _COMMON["model"],
        "input": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}]},
        "truncate": {"type": ["boolean", "null"]},
        "keep_alive": _COMMON["keep_alive"],
        "options": _OPTIONS_SCHEMA,
    },
}
_EMBEDDINGS_BODY = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "model": _COMMON["model"],
        "prompt": {"type": "string"},
        "keep_alive": _COMMON["keep_alive"],
        "options": _OPTIONS_SCHEMA,
    },
}
_PULL_BODY = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "model": {"type": "string", "description": "an http(s) URL to a GGUF file, or hf:org/repo/file.gguf"},
        "stream": {"type": ["boolean", "null"], "description": "NDJSON status lines (default true)"},
        "insecure": {"type": ["boolean", "null"]},
        "hive_id": {"type": "string", "description": "the hive to download to (default: the local or only hive)"},
    },
}
_EMBED_RESPONSES = _errors(
    {
        400: "invalid request",
        404: "no such model",
        409: "a hive of the model is offline",
        429: "the queue is full (Retry-After)",
        502: "the worker failed",
        503: "no worker can serve the model",
        504: "loading the model ran past its deadline",
    }
)
_DELETE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "deleted from every hive that had it"},
    **_errors(
        {
            400: "invalid request",
            403: "deleting needs the admin token",
            404: "no such model",
            409: "the model is in use, or its hive is offline",
            502: "the hive failed or did not answer",
        }
    ),
}
_PULL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "NDJSON status lines (stream) or one object",
        "content": {_NDJSON: {}, "application/json": {}},
    },
    **_errors(
        {
            400: "not a URL or hf: source, or the source is not a GGUF file",
            403: "downloading needs the admin token, or the source is not allowed",
            404: "no such hive, or the source was not found",
            409: "the hive is offline, or the model is already there",
            502: "the download or the hive failed",
            504: "the download ran past its deadline",
        }
    ),
}


def ollama_router() -> APIRouter:
    router = APIRouter(tags=["ollama"])

    @router.post(
        "/api/generate",
        summary="Generate (Ollama)",
        response_model=None,
        responses=_GENERATE_RESPONSES,
        openapi_extra=_body_schema(_GENERATE_BODY),
    )
    async def generate(request: Request) -> Response:
        return await _generate(request, chat=False)

    @router.post(
        "/api/chat",
        summary="Chat (Ollama)",
        response_model=None,
        responses=_GENERATE_RESPONSES,
        openapi_extra=_body_schema(_CHAT_BODY),
    )
    async def chat(request: Request) -> Response:
        return await _generate(request, chat=True)

    @router.get("/api/tags", summary="Models the cluster can serve (Ollama list)")
    async def tags(request: Request) -> dict[str, Any]:
        return {"models": [m.tag() for m in _models(_state(request))]}

    @router.post(
        "/api/show",
        summary="One model's details (Ollama)",
        response_model=None,
        responses=_errors({400: "invalid request", 404: "no such model"}),
        openapi_extra=_body_schema(_SHOW_BODY),
    )
    async def show(request: Request) -> Response:
        try:
            body = await _json_body(request)
            if not isinstance(body, dict):
                raise _Refused("the body must be a JSON object")
            name = _model_name(body)
        except _Refused as exc:
            return _error(exc.message, exc.status)
        except errors.PayloadTooLarge:
            raise
        except errors.RbeeError as exc:
            return _error(exc.message, 400)
        model = _find(_state(request), name)
        if model is None:
            return _error(_not_found(name), 404)
        return JSONResponse(_show(model))

    @router.get("/api/ps", summary="Loaded models: running workers (Ollama)")
    async def ps(request: Request) -> dict[str, Any]:
        return {"models": _ps(_state(request))}

    @router.get("/api/version", summary="The Ollama API version (and rbee's)")
    async def version() -> dict[str, Any]:
        return {"version": OLLAMA_VERSION, "rbee_version": __version__}

    @router.post(
        "/api/embed",
        summary="Embeddings of one text or several (Ollama; mean-pooled, unit length)",
        response_model=None,
        responses=_EMBED_RESPONSES,
        openapi_extra=_body_schema(_EMBED_BODY),
    )
    async def embed(request: Request) -> Response:
        return await _embed(request, legacy=False)

    @router.post(
        "/api/embeddings",
        summary="The embedding of one prompt (Ollama's older endpoint)",
        response_model=None,
        responses=_EMBED_RESPONSES,
        openapi_extra=_body_schema(_EMBEDDINGS_BODY),
    )
    async def embeddings(request: Request) -> Response:
        return await _embed(request, legacy=True)

    @router.delete(
        "/api/delete",
        summary="Delete a model from the hives that have it (Ollama; admin token)",
        response_model=None,
        responses=_DELETE_RESPONSES,
        openapi_extra=_body_schema(_SHOW_BODY),
    )
    async def delete(request: Request) -> Response:
        return await _delete(request)

    @router.post(
        "/api/pull",
        summary="Download a GGUF model to a hive (Ollama; an http(s) URL or hf: source; admin token)",
        response_model=None,
        responses=_PULL_RESPONSES,
        openapi_extra=_body_schema(_PULL_BODY),
    )
    async def pull(request: Request) -> Response:
        return await _pull(request)

    return router

"""Anthropic's Messages API on the queen: ``/v1/messages`` and ``/v1/messages/count_tokens``.

Built as the OpenAI-compatible API is (:mod:`rbee.queen.openai`): every
message request becomes an ordinary ``infer`` job in the queen's registry
(admitted, scheduled, queued, narrated, cancellable, in the history; the
``x-rbee-job-id`` header names it, ``request-id`` is ``req_`` and the job's
id), and the job's events are translated into Anthropic's shapes:

* not streaming: one ``message`` object once the job has ended;
* streaming: Anthropic's events in Anthropic's order (``message_start``,
  ``content_block_start``, ``ping``, ``content_block_delta`` ...,
  ``content_block_stop``, ``message_delta``, ``message_stop``). The response
  starts with the first token (or the end), so a failure before any output is
  still answered with its status; after that it is an ``error`` event and the
  stream closes without ``message_stop``.

A client that goes away cancels its job. The chat goes through the model's
chat template on the worker; ``system`` becomes a system message.

Tools (``tools``: ``{name, description, input_schema}``) follow ``tool_choice``
as the OpenAI-compatible API's tools do (the same call schema and instructions,
:mod:`rbee.queen.openai`): ``any`` (one of the tools) and ``tool`` (the one
named) make the answer a call generated under a grammar of the call's JSON
schema, so its ``input`` validates against the tool's ``input_schema``; it is
answered as a ``tool_use`` block (``id`` ``toolu_...``, ``name``, ``input``)
with ``stop_reason: "tool_use"``, streamed as ``content_block_start`` of type
``tool_use`` and ``input_json_delta`` deltas of the input's JSON text. ``auto``
(the default with tools) does what the OpenAI route's ``auto`` does: a model
whose own chat template renders tools (the hive's ``chat_tools``) gets them, and
its calls are read from its answer in its family's format
(:mod:`rbee.queen.toolcalls`): the text before them as a text block, each call
a ``tool_use`` block (streamed once it is whole), ``stop_reason: "tool_use"``
(narrated as ``anthropic_tools_template``); with any other model ``auto``
answers text and the job's narration says so (``anthropic_tools_auto``).
``none`` answers text. A call cut short (by
``max_tokens``) before its input is whole is answered as the text it is. In
the conversation, an assistant's ``tool_use`` blocks go back to the template as
the call's JSON, a user's ``tool_result`` blocks as ``Tool result (name): ...``
(``Tool error`` with ``is_error``), in the turn they came in; a result must
answer a ``tool_use`` id of an earlier assistant turn.

Errors are Anthropic's ``{"type": "error", "error": {"type", "message"}}``
with Anthropic's statuses: bad input 400, an unknown model 404, a full queue
429 (``rate_limit_error``, with ``Retry-After``), no worker that can serve the
model 529 (``overloaded_error``, what Anthropic's clients treat as "try again
later"; rbee's own API says 503), a job past its deadline 504
(``timeout_error``), a lost or failed worker 502 (``api_error``). A job
cancelled by someone else is 409 with ``x-should-retry: false``, so the
clients do not send it again.

Defaults follow Anthropic's: ``temperature`` 1 (at most 1), no ``top_p`` or
``top_k`` cut-off. What rbee cannot do (image and document blocks, Anthropic's
server tools, extended thinking) is refused with a 400 naming it.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask

from rbee import errors
from rbee.contracts.operations import Infer, parse_operation
from rbee.http import anthropic_error_body
from rbee.jobs.job import Job
from rbee.narration import bound, narrate
from rbee.queen import toolcalls
from rbee.queen.bodies import body_schema as _body_schema
from rbee.queen.bodies import invalid as _invalid
from rbee.queen.bodies import number as _number
from rbee.queen.bodies import queen_state as _state
from rbee.queen.openai.errors import STATUS_BY_KIND as _STATUS_BY_KIND
from rbee.queen.scheduler import COUNT_TIMEOUT_S
from rbee.queen.state import QueenState
from rbee.queen.tools import TOOL_NAME as _TOOL_NAME
from rbee.queen.tools import CallStream as _CallStream
from rbee.queen.tools import Tools as _Tools
from rbee.queen.tools import parse_tool_call as _parse_tool_call
from rbee.queen.tools import with_instructions as _with_instructions
from rbee.queen.translate import JOB_ID_HEADER, opening
from rbee.queen.translate import Events as _Events
from rbee.queen.translate import collect as _collect
from rbee.queen.translate import job_events as _job_events
from rbee.queen.translate import json_body as _json_body
from rbee.queen.translate import release as _release
from rbee.queen.translate import renders_tools as _renders_tools
from rbee.queen.translate import unless_disconnected as _unless_disconnected
from rbee.server.sse import EventStream, ServerSentEvent

__all__ = ["REQUEST_ID_HEADER", "anthropic_router"]

REQUEST_ID_HEADER = "request-id"
_CLIENT_GONE = 499
_SUPPORTED_BLOCKS = "text blocks are; tool_use blocks in assistant turns, tool_result blocks in user turns"

# -- errors ------------------------------------------------------------------


def _status(rbee_status: int) -> int:
    """rbee's status -> Anthropic's: bad input is 400, "no worker now" is 529 (overloaded)."""
    if rbee_status == 422:
        return 400
    if rbee_status == 503:
        return 529
    return rbee_status


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if status == 409:
        headers["x-should-retry"] = "false"  # a cancelled job is not retried by the client
    return JSONResponse(anthropic_error_body(message, status=status), status, headers=headers)


def _rbee_error_response(exc: errors.RbeeError, headers: dict[str, str]) -> JSONResponse:
    if isinstance(exc, errors.QueueFull):
        headers = {**headers, "Retry-After": str(exc.retry_after_s)}
    message = exc.message
    if isinstance(exc, errors.InvalidOperation) and exc.field and exc.field != "operation":
        # Name the field as the client wrote it: messages[0].content, not messages.0.content.
        name = _field(exc.field)
        if message.startswith(exc.field):
            message = name + message[len(exc.field) :]
        elif not message.startswith(name):
            message = f"{name}: {message}"
    return _error(message, _status(exc.status_code), headers)


def _end_failure(end: dict[str, Any]) -> tuple[str, int]:
    error = end.get("error") or {}
    kind = str(error.get("kind") or end.get("status") or "internal")
    message = str(error.get("message") or f"the job ended {end.get('status')}")
    return message, _status(_STATUS_BY_KIND.get(kind, 500))


def _end_error_response(end: dict[str, Any], headers: dict[str, str]) -> JSONResponse:
    message, status = _end_failure(end)
    if status == 429:
        headers = {**headers, "Retry-After": "2"}
    return _error(message, status, headers)


def _field(field: str) -> str:
    """``messages.0.content`` (pydantic) -> ``messages[0].content``."""
    parts = field.split(".")
    out = parts[0]
    for part in parts[1:]:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


# -- requests ----------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    op: Infer
    model: str
    stream: bool
    stop: tuple[str, ...]
    #: The tools and what ``tool_choice`` asks of them (no tools: choice ``none``).
    tools: _Tools
    #: ``auto`` with a model whose own chat template renders tools: they go to it, and its
    #: calls are read from the answer in its family's format (:mod:`rbee.queen.toolcalls`).
    template_tools: bool = False

    @property
    def calling(self) -> bool:
        """The answer is a grammar-constrained tool call (``tool_choice`` any or tool)."""
        return self.tools.calls


def _text(content: Any, where: str) -> str:
    """A string, or a list of text blocks (joined); any other block is refused by type."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(where, "must be a string or a list of content blocks")
    texts = []
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(block, dict):
            raise _invalid(at, "must be a content block object")
        kind = block.get("type")
        if kind != "text":
            raise _invalid(f"{at}.type", f"{kind!r} blocks are not supported ({_SUPPORTED_BLOCKS})")
        if not isinstance(block.get("text"), str):
            raise _invalid(f"{at}.text", "must be a string")
        texts.append(block["text"])
    return "".join(texts)


def _result_text(content: Any, where: str) -> str:
    """A ``tool_result``'s content: a string, or text blocks (joined)."""
    if content is None:
        return ""
    if isinstance(content, list):
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind != "text":
                raise _invalid(f"{where}[{j}].type", f"{kind!r} blocks are not supported in a tool result (text only)")
    return _text(content, where)


def _turn(content: Any, where: str, role: str, names: dict[str, str]) -> str:
    """A message's content as one turn's text.

    Text blocks are joined as they are; an assistant's ``tool_use`` block becomes
    the call's JSON (``{"name", "arguments"}``, what a constrained call generates),
    a user's ``tool_result`` block ``Tool result (name): ...``, each a part of its
    own. ``names`` maps the ``tool_use`` ids seen so far to their tools' names.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(where, "must be a string or a list of content blocks")
    parts: list[str] = []
    text = False  # the last part is text, which a next text block continues
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(block, dict):
            raise _invalid(at, "must be a content block object")
        kind = block.get("type")
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise _invalid(f"{at}.text", "must be a string")
            if text:
                parts[-1] += block["text"]
            else:
                parts.append(block["text"])
            text = True
            continue
        if kind == "tool_use" and role == "assistant":
            call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
            if not isinstance(call_id, str) or not call_id:
                raise _invalid(f"{at}.id", "must be the call's id (a non-empty string)")
            if not isinstance(name, str) or not name:
                raise _invalid(f"{at}.name", "must be the tool's name")
            if not isinstance(arguments, dict):
                raise _invalid(f"{at}.input", "must be an object (the tool's input)")
            names[call_id] = name
            parts.append(_dumps({"name": name, "arguments": arguments}))
        elif kind == "tool_result" and role == "user":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str) or call_id not in names:
                raise _invalid(
                    f"{at}.tool_use_id", f"{call_id!r} is not the id of a tool_use block in an earlier assistant turn"
                )
            is_error = block.get("is_error", False)
            if not isinstance(is_error, bool):
                raise _invalid(f"{at}.is_error", "must be true or false")
            result = _result_text(block.get("content"), f"{at}.content")
            parts.append(f"Tool {'error' if is_error else 'result'} ({names[call_id]}): {result}")
        else:
            hint = f" in {role} turns" if kind in ("tool_use", "tool_result") else ""
            raise _invalid(f"{at}.type", f"{kind!r} blocks are not supported{hint} ({_SUPPORTED_BLOCKS})")
        text = False
    return ("\n" if role == "assistant" else "\n\n").join(parts)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    system = body.get("system")
    if system is not None:
        text = _text(system, "system")
        if text:
            out.append({"role": "system", "content": text})
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _invalid("messages", "must be a non-empty list of {role, content}")
    names: dict[str, str] = {}
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(where, "must be an object with role and content")
        role = message.get("role")
        if role not in ("user", "assistant"):
            hint = " (the system prompt is the top-level system field)" if role == "system" else ""
            raise _invalid(f"{where}.role", f"{role!r} is not supported: user or assistant{hint}")
        if "content" not in message:
            raise _invalid(f"{where}.content", "Field required")
        out.append({"role": role, "content": _turn(message["content"], f"{where}.content", role, names)})
    return out


def _tools(body: dict[str, Any]) -> _Tools:
    """``tools`` and ``tool_choice`` as the OpenAI route's :class:`~rbee.queen.openai._Tools`."""
    raw = body.get("tools")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise _invalid("tools", "must be a list of {name, description, input_schema}")
    functions: list[dict[str, Any]] = []
    for i, tool in enumerate(raw):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _invalid(at, "must be a tool object {name, description, input_schema}")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise _invalid(f"{at}.type", f"{kind!r} tools are not supported (only custom tools, with an input_schema)")
        name = tool.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise _invalid(f"{at}.name", f"{name!r} must be 1-64 letters, digits, _ or -")
        if any(f["name"] == name for f in functions):
            raise _invalid(f"{at}.name", f"{name!r} is given twice")
        schema = tool.get("input_schema")
        if schema is None:
            raise _invalid(f"{at}.input_schema", "Field required (a JSON schema of an object)")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise _invalid(f"{at}.input_schema", 'must be a JSON schema of an object ("type": "object")')
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise _invalid(f"{at}.description", "must be a string")
        entry: dict[str, Any] = {"name": name, "parameters": schema}
        if description:
            entry["description"] = description
        functions.append(entry)
    choice = body.get("tool_choice")
    if choice is None:
        return _Tools(tuple(functions), "auto" if functions else "none")
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise _invalid("tool_choice", "must be {type: auto}, {type: any}, {type: tool, name} or {type: none}")
    parallel = choice.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        raise _invalid("tool_choice.disable_parallel_tool_use", "must be true or false")
    if kind == "none":
        return _Tools(tuple(functions), "none")
    if not functions:
        raise _invalid("tool_choice", f"{{type: {kind}}} needs tools")
    if kind == "auto":
        return _Tools(tuple(functions), "auto")
    if kind == "any":
        return _Tools(tuple(functions), "required")
    name = choice.get("name")
    if not isinstance(name, str) or not name:
        raise _invalid("tool_choice.name", "Field required (the tool to call)")
    if all(f["name"] != name for f in functions):
        raise _invalid("tool_choice.name", f"no tool is named {name!r}")
    return _Tools(tuple(functions), "function", name)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        raise _invalid("thinking", "extended thinking is not supported")
    for name in ("mcp_servers", "container"):
        if body.get(name):
            raise _invalid(name, "not supported")
    output = body.get("output_config")
    if body.get("output_format") or (isinstance(output, dict) and output.get("format")):
        name = "output_format" if body.get("output_format") else "output_config.format"
        raise _invalid(name, "structured output formats are not supported")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _invalid("metadata", "must be an object")


def _parse(body: Any, *, counting: bool = False) -> _Call:
    if not isinstance(body, dict):
        raise errors.InvalidOperation("the body must be a JSON object", field=None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "Field required (a model id or alias, see GET /v1/models)")
    _refuse_unsupported(body)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _invalid("stream", "must be true or false")
    if counting:
        max_tokens = 1
    else:
        if body.get("max_tokens") is None:
            raise _invalid("max_tokens", "Field required")
        max_tokens = _number(body, "max_tokens", integer=True, low=1)
    stop = body.get("stop_sequences")
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _invalid("stop_sequences", "must be a list of non-empty strings")
    temperature = _number(body, "temperature", high=1)
    top_p = _number(body, "top_p", high=1)
    top_k = _number(body, "top_k", integer=True)
    tools = _tools(body)
    messages = _messages(body)
    constraint: dict[str, Any] = {}
    if tools.calls:
        # The call is the answer: generated under its schema, the tools told in the system turn.
        messages = _with_instructions(messages, tools.instructions())
        constraint["json_schema"] = tools.schema()
    fields: dict[str, Any] = {
        "operation": "infer",
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        # Anthropic's defaults: temperature 1, the whole distribution.
        "temperature": 1.0 if temperature is None else temperature,
        "top_p": 1.0 if top_p is None else top_p,
        "top_k": 0 if top_k is None else top_k,
        "stop": stop,
        **constraint,
    }
    try:
        op = parse_operation(fields)
    except errors.InvalidOperation as exc:
        if exc.field is not None and exc.field.split(".")[0] == "json_schema":
            exc.field = "tools"  # the call's schema is made of the tools' input schemas
        raise
    assert isinstance(op, Infer)
    return _Call(op=op, model=model, stream=stream, stop=tuple(stop), tools=tools)


# -- answers -----------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _stop(call: _Call, end: dict[str, Any]) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence``.

    A worker that says which stop string ended the answer (``stop_sequence`` in
    the end event) is believed; otherwise a stop with one stop sequence asked
    for is that one. With several, and no word from the worker, the first is
    named (the worker's "stop" does not say which one matched).
    """
    reason = end.get("stop_reason")
    if reason == "max_tokens":
        return "max_tokens", None
    if reason == "stop" and call.stop:
        matched = end.get("stop_sequence")
        if isinstance(matched, str):
            return ("stop_sequence", matched) if matched in call.stop else ("end_turn", None)
        return "stop_sequence", call.stop[0]
    return "end_turn", None


def _usage(end: dict[str, Any]) -> dict[str, int]:
    return {"input_tokens": int(end.get("tokens_in") or 0), "output_tokens": int(end.get("tokens_out") or 0)}


def _message_id(job: Job) -> str:
    return "msg_" + job.id.removeprefix("job-").replace("-", "")


def _request_id(job: Job | None = None) -> str:
    if job is None:
        return "req_" + uuid.uuid4().hex
    return "req_" + job.id.removeprefix("job-").replace("-", "")


def _tool_use_id() -> str:
    return f"toolu_{secrets.token_hex(12)}"


def _tool_use(text: str) -> dict[str, Any] | None:
    """The ``tool_use`` block of a generated call, or None if it is not a whole one (cut short)."""
    call = _parse_tool_call(text)
    if call is None:
        return None
    arguments = json.loads(call[1])
    if not isinstance(arguments, dict):
        return None
    return {"type": "tool_use", "id": _tool_use_id(), "name": call[0], "input": arguments}


def _template_blocks(call: _Call, text: str) -> list[dict[str, Any]] | None:
    """A template-tools answer's blocks: its text, then a ``tool_use`` block per call (None: no call)."""
    parsed = toolcalls.parse(text, [f["name"] for f in call.tools.functions])
    if not parsed.calls:
        return None
    blocks: list[dict[str, Any]] = [{"type": "text", "text": parsed.content}] if parsed.content else []
    for found in parsed.calls:
        blocks.append(
            {"type": "tool_use", "id": _tool_use_id(), "name": found.name, "input": json.loads(found.arguments)}
        )
    return blocks


def _message(call: _Call, job: Job, text: str, end: dict[str, Any]) -> dict[str, Any]:
    reason, sequence = _stop(call, end)
    content: list[dict[str, Any]] | None = [{"type": "text", "text": text}]
    if call.calling:
        block = _tool_use(text)
        if block is not None:
            content, reason, sequence = [block], "tool_use", None
    elif call.template_tools:
        blocks = _template_blocks(call, text)
        if blocks is not None:
            content, reason, sequence = blocks, "tool_use", None
    return {
        "id": _message_id(job),
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": _usage(end),
    }


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {_dumps(data)}\n\n".encode()


#: Anthropic's keep-alive is an event of its own, which its SDKs skip.
_PING = ServerSentEvent(event="ping", data='{"type":"ping"}')


def _block_start(block: dict[str, Any], index: int = 0) -> bytes:
    return _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})


def _block_stop(index: int = 0) -> bytes:
    return _event("content_block_stop", {"type": "content_block_stop", "index": index})


def _text_delta(text: str, index: int = 0) -> bytes:
    head = f'{{"type":"content_block_delta","index":{index},"delta":{{"type":"text_delta","text":'
    return f"event: content_block_delta\ndata: {head}{_dumps(text)}}}}}\n\n".encode()


def _json_delta(piece: str, index: int = 0) -> bytes:
    delta = {"type": "input_json_delta", "partial_json": piece}
    return _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


class _TextStream:
    """A plain answer: one text block, opened before the first token."""

    def opening(self) -> bytes:
        return _block_start({"type": "text", "text": ""})

    def feed(self, text: str) -> bytes:
        return _text_delta(text)

    def finish(self) -> tuple[bytes, bool]:
        return _block_stop(), False


class _ToolUseStream:
    """A generated call as Anthropic's ``tool_use`` block events: the block once the name
    is known, then the input's JSON text as ``input_json_delta`` pieces."""

    def __init__(self) -> None:
        self.calls = _CallStream()  # the OpenAI route's: the name, then the arguments' text
        self.opened = False

    def opening(self) -> bytes:
        return b""

    def feed(self, text: str) -> bytes:
        out = []
        for delta in self.calls.feed(text):
            if not self.opened:
                self.opened = True
                block = {"type": "tool_use", "id": _tool_use_id(), "name": delta["function"]["name"], "input": {}}
                out.append(_block_start(block))
            if delta["function"]["arguments"]:
                out.append(_json_delta(delta["function"]["arguments"]))
        return b"".join(out)

    def finish(self) -> tuple[bytes, bool]:
        """The block's last events, and whether the call is whole (else it was cut short)."""
        if not self.opened:
            # Cut short before the name: what there is, as text.
            text = self.calls.text
            delta = _text_delta(text) if text else b""
            return _block_start({"type": "text", "text": ""}) + delta + _block_stop(), False
        tail = b"".join(_json_delta(d["function"]["arguments"]) for d in self.calls.finish())
        return tail + _block_stop(), _tool_use(self.calls.text) is not None


class _TemplateStream:
    """An answer in the model's own tool-call format: its text as a text block, until a call
    opens; each call, once whole, a ``tool_use`` block of its own (:mod:`rbee.queen.toolcalls`)."""

    def __init__(self, call: _Call) -> None:
        self.scanner = toolcalls.ToolCallScanner([f["name"] for f in call.tools.functions])
        self.index = 0
        self.text_open = False
        self.called = False

    def opening(self) -> bytes:
        return b""

    def _frames(self, items: list[str | toolcalls.ToolCall]) -> bytes:
        out = []
        for item in items:
            if isinstance(item, str):
                if not item:
                    continue
                if not self.text_open:
                    out.append(_block_start({"type": "text", "text": ""}, self.index))
                    self.text_open = True
                out.append(_text_delta(item, self.index))
                continue
            if self.text_open:
                out.append(_block_stop(self.index))
                self.text_open = False
                self.index += 1
            block = {"type": "tool_use", "id": _tool_use_id(), "name": item.name, "input": {}}
            out.append(_block_start(block, self.index))
            out.append(_json_delta(item.arguments, self.index))
            out.append(_block_stop(self.index))
            self.index += 1
            self.called = True
        return b"".join(out)

    def feed(self, text: str) -> bytes:
        return self._frames(self.scanner.feed(text))

    def finish(self) -> tuple[bytes, bool]:
        out = self._frames(self.scanner.finish())
        if self.text_open:
            out += _block_stop(self.index)
        elif not self.called and self.index == 0:
            out += _block_start({"type": "text", "text": ""}) + _block_stop()  # nothing said: an empty text
        return out, self.called


async def _stream(
    state: QueenState, job: Job, call: _Call, first: tuple[str, Any], events: _Events
) -> AsyncIterator[bytes]:
    try:
        start: dict[str, Any] = {
            "id": _message_id(job),
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # The prompt's tokens are known at the end (message_delta says them).
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        yield _event("message_start", {"type": "message_start", "message": start})
        blocks: _TextStream | _ToolUseStream | _TemplateStream = _TextStream()
        if call.calling:
            blocks = _ToolUseStream()
        elif call.template_tools:
            blocks = _TemplateStream(call)
        opening = blocks.opening()
        if opening:
            yield opening
        yield _event("ping", {"type": "ping"})
        kind, data = first
        while kind == "token":
            frame = blocks.feed(data)
            if frame:
                yield frame
            kind, data = await anext(events)
        end = data
        if end.get("status") != "completed":
            # The failure is the last thing said: no message_stop after it.
            message, status = _end_failure(end)
            yield _event("error", anthropic_error_body(message, status=status))
            return
        reason, sequence = _stop(call, end)
        tail, called = blocks.finish()
        yield tail
        if called:
            reason, sequence = "tool_use", None
        yield _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": _usage(end),
            },
        )
        yield _event("message_stop", {"type": "message_stop"})
    finally:
        await _release(state, job, events)


# -- endpoints -----------------------------------------------------------------


def _offer_tools(state: QueenState, call: _Call) -> _Call:
    """``tool_choice`` auto: the tools go to a model whose own chat template renders them."""
    tools = call.tools
    if tools.choice != "auto" or not tools.functions or not _renders_tools(state, call.model):
        return call
    return replace(call, op=call.op.model_copy(update={"tools": tools.as_openai()}), template_tools=True)


async def _messages_endpoint(request: Request) -> Response:
    state = _state(request)
    try:
        call = _offer_tools(state, _parse(await _json_body(request)))
        job = await state.jobs.submit(call.op)
    except errors.RbeeError as exc:
        return _rbee_error_response(exc, {REQUEST_ID_HEADER: _request_id()})
    with bound(job, actor="queen"):
        narrate(
            "anthropic_request",
            f"Anthropic /v1/messages request for {call.model}{' (streaming)' if call.stream else ''}",
            path="/v1/messages",
            stream=call.stream,
        )
        if call.template_tools:
            names = [f["name"] for f in call.tools.functions]
            narrate(
                "anthropic_tools_template",
                f"tool_choice auto: {len(names)} tool(s) given to the model's chat template; its calls are read "
                "from the answer",
                tools=names,
            )
        elif call.tools.choice == "auto":
            names = [f["name"] for f in call.tools.functions]
            narrate(
                "anthropic_tools_auto",
                f"tool_choice auto: answered as text ({len(names)} tool(s) not offered): the model's chat "
                "template has no place for tools; give tool_choice any or tool for a call",
                tools=names,
            )
    headers = {JOB_ID_HEADER: job.id, REQUEST_ID_HEADER: _request_id(job)}
    events = _job_events(job)
    first = await opening(request, state, job, events, stream=call.stream)
    if first is None:
        return Response(status_code=_CLIENT_GONE, headers=headers)
    if not call.stream:
        text, end = first
        if end.get("status") != "completed":
            return _end_error_response(end, headers)
        return JSONResponse(_message(call, job, text, end), headers=headers)
    kind, data = first
    if kind == "end" and data.get("status") != "completed":
        await events.aclose()
        return _end_error_response(data, headers)
    return EventStream(
        _stream(state, job, call, first, events),
        ping_s=state.settings.ping_interval_s,
        ping=_PING,
        headers=headers,
        background=BackgroundTask(_release, state, job, events),
    )


async def _count_on_worker(state: QueenState, op: Infer) -> int | None:
    """The prompt's tokens as a ready worker of the model counts them, or None if none answers."""
    workers = [w for w in state.scheduler.candidates(op, set()) if w.report.url]
    for worker in sorted(workers, key=lambda w: state.scheduler.inflight.get(w.worker_id, 0)):
        token = worker.token or state.settings.token
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        try:
            response = await state.http.post(
                f"{worker.report.url}/v1/tokens/count",
                content=op.model_dump_json(),
                headers=headers,
                timeout=COUNT_TIMEOUT_S,
            )
        except httpx.HTTPError:
            continue
        if response.status_code == 422:
            error = response.json().get("error") or {}
            raise errors.InvalidOperation(
                str(error.get("message") or "the worker refused the input"), field=error.get("field")
            )
        if response.status_code == 200:
            return int(response.json()["tokens_in"])
    return None


async def _count_tokens_endpoint(request: Request) -> Response:
    """Counted by a ready worker; with none, a one-token job starts one and says its prompt's tokens."""
    state = _state(request)
    headers = {REQUEST_ID_HEADER: _request_id()}
    try:
        call = _offer_tools(state, _parse(await _json_body(request), counting=True))
        pending = state.router.admit(call.op)  # an unknown model is 404 here, as for /v1/messages
        if pending is not None:
            await pending
        counted = await _count_on_worker(state, call.op)
        if counted is not None:
            return JSONResponse({"input_tokens": counted}, headers=headers)
        job = await state.jobs.submit(call.op.model_copy(update={"temperature": 0.0, "stop": []}))
    except errors.RbeeError as exc:
        return _rbee_error_response(exc, headers)
    headers = {JOB_ID_HEADER: job.id, REQUEST_ID_HEADER: _request_id(job)}
    events = _job_events(job)
    try:
        present, first = await _unless_disconnected(request, _collect(events))
    finally:
        await _release(state, job, events)
    if not present or first is None:
        return Response(status_code=_CLIENT_GONE, headers=headers)
    _text_out, end = first
    if end.get("status") != "completed":
        return _end_error_response(end, headers)
    return JSONResponse({"input_tokens": int(end.get("tokens_in") or 0)}, headers=headers)


# -- the OpenAPI description ---------------------------------------------------

_TEXT_BLOCK = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_TOOL_USE_BLOCK = {
    "type": "object",
    "required": ["type", "id", "name", "input"],
    "properties": {
        "type": {"const": "tool_use"},
        "id": {"type": "string", "minLength": 1},
        "name": {"type": "string", "minLength": 1},
        "input": {"type": "object"},
    },
}
_TOOL_RESULT_BLOCK = {
    "type": "object",
    "required": ["type", "tool_use_id"],
    "properties": {
        "type": {"const": "tool_result"},
        "tool_use_id": {"type": "string", "description": "the id of a tool_use block of an earlier assistant turn"},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_BLOCK}]},
        "is_error": {"type": "boolean"},
    },
}
_CONTENT = {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_BLOCK}]}
_TURN_CONTENT = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"anyOf": [_TEXT_BLOCK, _TOOL_USE_BLOCK, _TOOL_RESULT_BLOCK]}},
    ]
}
_TOOL = {
    "type": "object",
    "required": ["name", "input_schema"],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "description": {"type": "string"},
        "input_schema": {"type": "object", "required": ["type"], "properties": {"type": {"const": "object"}}},
    },
}
_TOOL_CHOICE = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"enum": ["auto", "any", "tool", "none"]},
        "name": {"type": "string", "description": "the tool to call (type tool)"},
        "disable_parallel_tool_use": {"type": "boolean"},
    },
}
_COMMON = {
    "model": {"type": "string", "minLength": 1},
    "messages": {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "required": ["role", "content"],
            "properties": {"role": {"enum": ["user", "assistant"]}, "content": _TURN_CONTENT},
        },
    },
    "system": _CONTENT,
    "tools": {"type": "array", "items": _TOOL},
    "tool_choice": _TOOL_CHOICE,
}
_MESSAGES_BODY = {
    "type": "object",
    "required": ["model", "max_tokens", "messages"],
    "properties": {
        **_COMMON,
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0},
        "stop_sequences": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "stream": {"type": "boolean"},
        "metadata": {"type": "object"},
    },
}
_COUNT_BODY = {"type": "object", "required": ["model", "messages"], "properties": _COMMON}

#: What the endpoints answer besides 200 (in Anthropic's error shape).
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid_request_error: bad input, naming the field"},
    403: {"description": "permission_error: this token may not do that"},
    404: {"description": "not_found_error: no such model"},
    409: {"description": "invalid_request_error: the job was cancelled"},
    429: {"description": "rate_limit_error: the queue is full (Retry-After)"},
    502: {"description": "api_error: the worker was lost or failed"},
    504: {"description": "timeout_error: the job ran past its deadline"},
    529: {"description": "overloaded_error: no worker can serve the model now"},
}


def anthropic_router() -> APIRouter:
    router = APIRouter(tags=["anthropic"])

    @router.post(
        "/v1/messages",
        summary="Create a message (Anthropic Messages API)",
        response_model=None,
        responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS},
        openapi_extra=_body_schema(_MESSAGES_BODY),
    )
    async def messages(request: Request) -> Response:
        return await _messages_endpoint(request)

    @router.post(
        "/v1/messages/count_tokens",
        summary="Count a message's input tokens (Anthropic Messages API)",
        response_model=None,
        responses=_ERRORS,
        openapi_extra=_body_schema(_COUNT_BODY),
    )
    async def count_tokens(request: Request) -> Response:
        return await _count_tokens_endpoint(request)

    return router

"""Tool calls in a model's own words: the formats chat templates teach, parsed from its output.

A model whose chat template renders tools answers a call in its family's format,
not in an API's. These are the formats llama.cpp's server parses for the common
families:

* Hermes, Qwen 2.5/3 and most fine-tunes: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call, text before them allowed;
* Llama 3.x: the output is the JSON ``{"name": ..., "parameters": {...}}`` (or ``arguments``;
  ``{"type": "function", ...}`` too), after ``<|python_tag|>`` when the model writes it as text,
  several separated by ``;``;
* Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}]`` (the marker is a control
  token, often not rendered: then the output is the bare JSON list), and the newer
  ``[TOOL_CALLS]name[ARGS]{...}``.

:func:`parse` reads a whole answer; :class:`ToolCallScanner` reads one as it is
generated, giving text until a call's opening appears and each call once it is
complete. Both give :class:`ToolCall` values with the arguments as JSON text, which
is what OpenAI's, Ollama's and Anthropic's shapes are made from. Something that
opens like a call but does not parse as one (cut short, or a name no tool has) is
text, as it was written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ParsedAnswer", "ToolCall", "ToolCallScanner", "parse"]

_HERMES_OPEN = "<tool_call>"
_HERMES_CLOSE = "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_MISTRAL = "[TOOL_CALLS]"
_MARKERS = (_HERMES_OPEN, _PYTHON_TAG, _MISTRAL)
#: How a bare JSON call starts (whitespace removed): Llama's object, Mistral's list.
_BARE_OPENINGS = ('{"name"', '{"type":"function"', '[{"name"')
_WHITESPACE = re.compile(r"\s+")
_MISTRAL_NAMED = re.compile(r"\s*([A-Za-z0-9_.-]{1,64})(?:\[CALL_ID\]([A-Za-z0-9]+))?\[ARGS\]")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolCall:
    name: str
    #: The arguments as JSON text (an object's, as the model gave it).
    arguments: str
    #: The id the model gave the call (Mistral's), if any.
    id: str | None = None


@dataclass(frozen=True)
class ParsedAnswer:
    #: The text around the calls (before them, and any after), stripped.
    content: str
    calls: list[ToolCall] = field(default_factory=list)


def parse(text: str, names: Collection[str] | None = None) -> ParsedAnswer:
    """The calls in a whole answer and the text around them. ``names``: the tools offered
    (a call of another name makes it text); None takes any name."""
    scanner = ToolCallScanner(names)
    items = scanner.feed(text) + scanner.finish()
    content = "".join(i for i in items if isinstance(i, str))
    return ParsedAnswer(content.strip(), [i for i in items if isinstance(i, ToolCall)])


class ToolCallScanner:
    """An answer read piece by piece: :meth:`feed` and :meth:`finish` give text (``str``) to
    pass on and :class:`ToolCall` values, in order.

    Text that may be the start of a call's opening is held back until it is known
    not to be; once a call has opened, what follows is held until it parses (a
    Hermes block at its closing tag, the other formats at the end).
    """

    def __init__(self, names: Collection[str] | None = None) -> None:
        self._names = None if names is None else frozenset(names)
        self._buffer = ""
        #: The format of the call that has opened: "hermes", "json" (bare or after a marker), "mistral".
        self._format: str | None = None
        #: Only whitespace has been passed on so far (a bare JSON call may still start).
        self._at_start = True
        #: The marker that opened a call, as written (text again if the call does not parse).
        self._held = ""
        #: A Hermes block that is no call: what follows is text.
        self._stuck = False
        #: How many calls have been given.
        self.calls = 0

    def feed(self, text: str) -> list[str | ToolCall]:
        self._buffer += text
        out: list[str | ToolCall] = []
        while True:
            before = (self._format, len(self._buffer))
            if self._format is None:
                self._scan_text(out)
            elif self._format == "hermes":
                self._scan_hermes(out)
            if (self._format, len(self._buffer)) == before:
                return out

    def finish(self) -> list[str | ToolCall]:
        """What is left once the answer has ended."""
        rest, self._buffer = self._buffer, ""
        if self._format is None:
            return [rest] if rest else []
        if self._format == "hermes":
            body = rest.strip()
            if not self._stuck and body.startswith(_HERMES_OPEN) and _HERMES_CLOSE not in body:
                calls = self._calls(body[len(_HERMES_OPEN) :])  # a block the model did not close
                if calls is not None:
                    return list(calls)
            # Text after the blocks (or a block that is no call) is the answer's too.
            return [rest] if body or not self.calls else []
        calls = self._mistral(rest) if self._format == "mistral" else self._calls(rest)
        if calls is None:
            return [self._held + rest]
        return list(calls)

    # -- before any call ---------------------------------------------------

    def _scan_text(self, out: list[str | ToolCall]) -> None:
        buffer = self._buffer
        if self._at_start:
            compact = _WHITESPACE.sub("", buffer)
            if not compact:
                return
            if any(compact.startswith(o) for o in _BARE_OPENINGS):
                self._open("json", buffer, 0, out)
                return
            if any(o.startswith(compact) for o in _BARE_OPENINGS):
                return  # may still become one
        found = [(buffer.find(m), m) for m in _MARKERS if m in buffer]
        if found:
            at, marker = min(found)
            kind = {"<tool_call>": "hermes", _PYTHON_TAG: "json", _MISTRAL: "mistral"}[marker]
            # A Hermes block keeps its opening tag in the buffer (the next block starts the same way).
            self._open(kind, buffer, at, out, skip=0 if kind == "hermes" else len(marker))
            return
        keep = _partial_marker(buffer)
        passed = buffer[: len(buffer) - keep]
        if passed:
            out.append(passed)
            self._at_start = self._at_start and not passed.strip()
        self._buffer = buffer[len(passed) :]

    def _open(self, kind: str, buffer: str, at: int, out: list[str | ToolCall], skip: int = 0) -> None:
        if at:
            out.append(buffer[:at])
        self._format = kind
        self._held = buffer[at : at + skip]
        self._buffer = buffer[at + skip :]

    # -- Hermes blocks -----------------------------------------------------

    def _scan_hermes(self, out: list[str | ToolCall]) -> None:
        stripped = self._buffer.lstrip()
        if self._stuck or not stripped.startswith(_HERMES_OPEN):
            return  # text after a block, or the next one still arriving: at the end
        close = stripped.find(_HERMES_CLOSE)
        if close < 0:
            return
        calls = self._calls(stripped[len(_HERMES_OPEN) : close])
        if calls is None:
            self._stuck = True
            return
        self._buffer = stripped[close + len(_HERMES_CLOSE) :]
        out.extend(calls)

    # -- JSON --------------------------------------------------------------

    def _calls(self, text: str) -> list[ToolCall] | None:
        """Every call in ``text``: JSON objects (or lists of them) separated by whitespace, ``;`` or ``,``."""
        values: list[Any] = []
        at = 0
        text = text.strip()
        while at < len(text):
            while at < len(text) and (text[at].isspace() or text[at] in ";,"):
                at += 1
            if at >= len(text):
                break
            try:
                value, at = _DECODER.raw_decode(text, at)
            except ValueError:
                return None
            values.extend(value if isinstance(value, list) else [value])
        calls = [self._call(v) for v in values]
        if not calls or any(c is None for c in calls):
            return None
        self.calls += len(calls)
        return [c for c in calls if c is not None]

    def _call(self, value: Any) -> ToolCall | None:
        if not isinstance(value, dict):
            return None
        if isinstance(value.get("function"), dict):  # {"type": "function", "function": {...}}
            value = {**value["function"], "id": value.get("id")}
        name = value.get("name")
        if "arguments" not in value and "parameters" not in value:
            return None
        arguments = value.get("arguments", value.get("parameters"))
        if not isinstance(name, str) or (self._names is not None and name not in self._names):
            return None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        call_id = value.get("id")
        return ToolCall(name, _dumps(arguments), call_id if isinstance(call_id, str) and call_id else None)

    def _mistral(self, text: str) -> list[ToolCall] | None:
        """After ``[TOOL_CALLS]``: a JSON list, or ``name[ARGS]{...}`` (several: each after its own marker)."""
        named = _MISTRAL_NAMED.match(text)
        if named is None:
            return self._calls(text)
        calls: list[ToolCall] = []
        for part in text.split(_MISTRAL):
            head = _MISTRAL_NAMED.match(part)
            if head is None:
                return None
            try:
                arguments, end = _DECODER.raw_decode(part, head.end())
            except ValueError:
                return None
            call = self._call({"name": head.group(1), "arguments": arguments, "id": head.group(2)})
            if call is None or part[end:].strip():
                return None
            calls.append(call)
        self.calls += len(calls)
        return calls


def _partial_marker(text: str) -> int:
    """How many characters at the end of ``text`` may be the start of a marker."""
    for n in range(min(len(text), max(len(m) for m in _MARKERS) - 1), 0, -1):
        tail = text[-n:]
        if any(m.startswith(tail) for m in _MARKERS):
            return n
    return 0


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

"""A chat's tools: validated from OpenAI's shape, turned into the JSON schema of a call
(the grammar a forced call is generated under), told to the model, and a generated call
read back whole or streamed as OpenAI's tool-call deltas. Calls in a model's own format
(``tool_choice`` auto) are read by :mod:`rbee.queen.toolcalls`.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, NoReturn

from rbee import errors
from rbee.queen.translate import dumps

__all__ = [
    "MAX_TOOLS",
    "TOOL_NAME",
    "CallStream",
    "Tools",
    "parse_tool_call",
    "parse_tools",
    "tool_call_id",
    "with_instructions",
]

#: The most tools one chat may offer (as many as Infer takes to a chat template).
MAX_TOOLS = 128


def _refuse(param: str, why: str) -> NoReturn:
    raise errors.InvalidOperation(f"{param}: {why}", field=param)


TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Tools:
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
        listed = "\n".join(dumps(f) for f in allowed)
        which = f"the function {self.name}" if self.choice == "function" else "one of these functions"
        return (
            f"You can call these functions:\n{listed}\n"
            f"Call {which}: answer with a JSON object with the function's name and its arguments, "
            '{"name": ..., "arguments": {...}}.'
        )


def parse_tools(body: dict[str, Any]) -> Tools:
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
        if not isinstance(name, str) or not TOOL_NAME.match(name):
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
        return Tools(tuple(functions), choice, parallel=parallel)
    named = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = named.get("name") if isinstance(named, dict) else None
    if not isinstance(name, str):
        _refuse("tool_choice", "must be none, auto, required or {type: function, function: {name}}")
    if all(f["name"] != name for f in functions):
        _refuse("tool_choice", f"no tool is named {name!r}")
    return Tools(tuple(functions), "function", name, parallel=parallel)


def with_instructions(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """``text`` at the start of the system turn (a new one if the chat has none)."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def tool_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def parse_tool_call(text: str) -> tuple[str, str] | None:
    """``(name, arguments as JSON text)`` of a generated call, or None if it is not one (cut short)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or "arguments" not in value:
        return None
    return value["name"], dumps(value["arguments"])


class CallStream:
    """A call streamed as OpenAI's tool-call deltas: the name once known, then the arguments' text."""

    def __init__(self) -> None:
        self.text = ""
        self.id = tool_call_id()
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

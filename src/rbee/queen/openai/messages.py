"""A chat's messages and a completion's prompt as Infer takes them."""

from __future__ import annotations

import json
from typing import Any

from rbee import errors
from rbee.queen.translate import dumps

__all__ = ["parse_messages", "parse_prompt"]


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
        out.append(dumps({"name": name, "arguments": parsed}))
    return out


def parse_messages(raw: Any) -> list[dict[str, str]]:
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


def parse_prompt(raw: Any) -> str:
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        return raw[0]
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list) and len(raw) > 1 and all(isinstance(p, str) for p in raw):
        raise errors.InvalidOperation("prompt: one prompt per request is supported, not a batch", field="prompt")
    raise errors.InvalidOperation("prompt must be a string (token arrays are not supported)", field="prompt")

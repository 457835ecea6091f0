"""Which chat template a model's chats use, and the templates rbee knows itself.

A GGUF that carries ``tokenizer.chat_template`` is rendered with it (by
llama-cpp-python's Jinja formatter, as ``create_chat_completion`` would):
``gguf``. A GGUF without one gets its family's turn format, chosen from
``general.architecture``: Gemma's (``<start_of_turn>user`` ...
``<start_of_turn>model``) for ``gemma``, ``gemma2``, ``gemma3``; every other
family gets ChatML (``<|im_start|>role`` ... ``<|im_end|>``), the format most
instruction-tuned GGUFs without a template were trained on. llama-cpp-python's
own fallback, llama-2's ``[INST]`` format, made the bundled Gemma model answer
with an empty string.

The hive says which one a model uses (``model get``, heartbeats) and the worker
narrates the one it used, from the same :func:`template_for`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["GGUF", "RenderedChat", "family_templates", "render", "template_for"]

#: The model's own template, from its GGUF.
GGUF = "gguf"

_GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3", "gemma3n"})


@dataclass(frozen=True)
class RenderedChat:
    """A chat as prompt text (special tokens written out), the strings that end the answer,
    and the special tokens that do (a model that opens the next turn has finished its own)."""

    text: str
    stop: list[str]
    stop_tokens: tuple[str, ...] = ()


def template_for(architecture: str | None, has_own_template: bool) -> str:
    """``gguf`` when the model has its own template, else ``gemma`` or ``chatml``."""
    if has_own_template:
        return GGUF
    if architecture in _GEMMA_ARCHITECTURES:
        return "gemma"
    return "chatml"


def _gemma(messages: Sequence[dict[str, str]]) -> RenderedChat:
    # Gemma has no system role: the system text opens the first user turn.
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    parts: list[str] = []
    first_user = True
    for m in messages:
        if m["role"] == "system":
            continue
        role = "model" if m["role"] == "assistant" else "user"
        content = m["content"]
        if role == "user" and first_user and system:
            content = f"{system}\n\n{content}"
        if role == "user":
            first_user = False
        parts.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    if system and first_user:  # only a system message: it is the user's turn
        parts.append(f"<start_of_turn>user\n{system}<end_of_turn>\n")
    parts.append("<start_of_turn>model\n")
    return RenderedChat("".join(parts), ["<end_of_turn>"], ("<end_of_turn>", "<start_of_turn>"))


def _chatml(messages: Sequence[dict[str, str]]) -> RenderedChat:
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    parts.append("<|im_start|>assistant\n")
    return RenderedChat("".join(parts), ["<|im_end|>", "<|im_start|>"], ("<|im_end|>", "<|im_start|>"))


_TEMPLATES = {"gemma": _gemma, "chatml": _chatml}


def family_templates() -> list[str]:
    """The templates rbee renders itself."""
    return sorted(_TEMPLATES)


def render(template: str, messages: Sequence[dict[str, str]]) -> RenderedChat:
    """Render ``messages`` with one of :func:`family_templates`."""
    try:
        fn = _TEMPLATES[template]
    except KeyError:
        raise ValueError(f"no built-in chat template {template!r} (known: {', '.join(family_templates())})") from None
    return fn(messages)

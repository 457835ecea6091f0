"""A Completions or Chat Completions body checked as OpenAI checks it and turned into the job to run.

Every parameter is one OpenAI (or llama.cpp's server) has: honoured, accepted as
information, or refused by name saying why; an unknown one is ``unknown_parameter``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NoReturn

from rbee import errors
from rbee.contracts.operations import Infer, parse_keep_alive, parse_operation
from rbee.queen.openai.messages import parse_messages, parse_prompt
from rbee.queen.tools import Tools, parse_tools, with_instructions
from rbee.queen.translate import DEFAULT_CHAT_MAX_TOKENS

__all__ = [
    "CHAT_BODY",
    "CHAT_TOP_LOGPROBS",
    "COMPLETION_BODY",
    "COMPLETION_TOP_LOGPROBS",
    "DEFAULT_CHAT_MAX_TOKENS",
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "INFORMATIONAL_LLAMA_CPP",
    "MAX_CHOICES",
    "NOTHING_ASKED",
    "UNSUPPORTED",
    "Call",
    "parse",
    "said",
    "same",
]

#: The most choices one request may ask for (``n``).
MAX_CHOICES = 8
#: The most alternatives a token's log-probability comes with (OpenAI's limits).
CHAT_TOP_LOGPROBS = 20
COMPLETION_TOP_LOGPROBS = 5
DEFAULT_COMPLETION_MAX_TOKENS = 16


@dataclass(frozen=True)
class Call:
    """One validated request: the job to run and how to answer."""

    op: Infer
    chat: bool
    model: str
    stream: bool
    include_usage: bool
    #: The body field that asked for a grammar (``response_format``, ``grammar``, ``json_schema``, ``tools``), if any.
    constrained_by: str = ""
    #: A chat's tools and tool_choice (None: a completion).
    tools: Tools | None = None
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
INFORMATIONAL_LLAMA_CPP = frozenset(
    {"cache_prompt", "samplers", "n_indent", "t_max_prompt_ms", "t_max_predict_ms", "id_slot"}
)
#: Parameters of OpenAI's API (and of llama.cpp's) rbee cannot honour: refused by name, saying why.
UNSUPPORTED: dict[str, str] = {
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
NOTHING_ASKED: dict[str, tuple[Any, ...]] = {
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


def said(name: str) -> str:
    return _UNSAFE_NAME.sub("?", name)[:64]


def same(value: Any, off: Any) -> bool:
    """``value == off``, with booleans and numbers kept apart (``True`` is not ``1``)."""
    return isinstance(value, bool) == isinstance(off, bool) and value == off


def _refuse_unknown(body: dict[str, Any], chat: bool) -> None:
    """OpenAI's answer to a parameter it does not know: 400 ``unknown_parameter`` naming it."""
    known = _HONOURED | _INFORMATIONAL | _LLAMA_CPP | INFORMATIONAL_LLAMA_CPP | set(UNSUPPORTED)
    known |= _HONOURED_CHAT if chat else _HONOURED_COMPLETION
    unknown = [said(str(k)) for k in body if k not in known]
    if unknown:
        which = "argument" if len(unknown) == 1 else "arguments"
        raise errors.InvalidOperation(
            f"Unrecognized request {which} supplied: {', '.join(unknown[:16])}",
            field=unknown[0],
            code="unknown_parameter",
        )


def _refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    """OpenAI's parameters rbee cannot honour: 400 ``unsupported_parameter`` naming each and saying why."""
    for name, why in UNSUPPORTED.items():
        value = body.get(name)
        if value is None or any(same(value, off) for off in NOTHING_ASKED.get(name, ())):
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


def parse(body: Any, chat: bool) -> Call:
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
    tools = parse_tools(body) if chat else None
    if tools is not None and tools.calls:
        if constrained_by:
            _refuse(constrained_by, f"cannot be given with tool_choice {tools.choice} (the call is the output)")
        constrained_by = "tools"
        fields["json_schema"] = tools.schema()
    if chat:
        fields["messages"] = parse_messages(body.get("messages"))
        if tools is not None and tools.calls:
            fields["messages"] = with_instructions(fields["messages"], tools.instructions())
    else:
        if "prompt" not in body:
            raise errors.InvalidOperation("prompt is required", field="prompt")
        fields["prompt"] = parse_prompt(body["prompt"])
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
    return Call(
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
COMPLETION_BODY = {
    "type": "object",
    "required": ["prompt"],
    "properties": {"prompt": {"type": "string"}, **_SAMPLING},
}
CHAT_BODY = {
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

"""Operations: what a client asks a server to do.

The wire format is internally tagged: ``{"operation": "<snake_case name>", ...fields}``.
Every operation is one pydantic model; :data:`Operation` is their discriminated
union and :func:`parse_operation` is the one place raw input becomes a typed
value. Validation errors become :class:`~rbee.errors.InvalidOperation` naming
the field and the reason.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rbee.errors import InvalidOperation
from rbee.units import KEEP_ALIVE_MAX_S, parse_keep_alive

__all__ = [
    "DEFAULT_MODEL",
    "LIMITS",
    "Operation",
    "HiveOperation",
    "OperationBase",
    "Status",
    "Infer",
    "ChatMessage",
    "CHAT_ROLES",
    "QueenCheck",
    "HiveList",
    "HiveCheck",
    "WorkerSpawn",
    "WorkerList",
    "WorkerGet",
    "WorkerStop",
    "WorkerStopAll",
    "ModelList",
    "ModelGet",
    "ModelDownload",
    "ModelDelete",
    "HIVE_OPERATIONS",
    "parse_operation",
    "validation_problems",
    "InfillFile",
    "check_model_ref",
    "check_prompt",
    "parse_keep_alive",
]

DEFAULT_MODEL = "gemma3-270m"


class _Limits:
    prompt_chars = 100_000
    max_tokens = 131_072
    stop_strings = 4
    stop_chars = 100
    #: A chat's turns are bounded by its characters (``prompt_chars``) and tokens; this only
    #: keeps a list of empty turns bounded.
    messages = 100_000
    #: More candidates than this change nothing a person can tell, and made llama.cpp's
    #: sampling 20x slower at 2^31.
    top_k = 1_000
    model_ref_chars = 256
    timeout_s = 86_400.0
    keep_alive_s = KEEP_ALIVE_MAX_S
    #: A GBNF grammar, or a JSON schema as JSON text.
    grammar_chars = 65_536
    logit_bias = 1_024
    top_logprobs = 20
    #: Other files given as context to a fill-in-the-middle prompt.
    infill_files = 64


LIMITS = _Limits()

_MODEL_REF = re.compile(r"^[A-Za-z0-9._:/-]+$")
_ID = re.compile(r"^[A-Za-z0-9._:-]+$")
# Control characters other than tab, newline, vertical tab and form feed (both common in
# text taken from PDFs and word processors) and carriage return, plus the Unicode bidi
# overrides that make text display differently from what it is.
_BAD_PROMPT_CHARS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f\u202a-\u202e\u2066-\u2069]")


def check_model_ref(value: str) -> str:
    """Model ids and aliases: ``[A-Za-z0-9._:/-]``, no ``..``, not absolute."""
    if not value:
        raise ValueError("must not be empty")
    if len(value) > LIMITS.model_ref_chars:
        raise ValueError(f"must be at most {LIMITS.model_ref_chars} characters")
    if not _MODEL_REF.match(value):
        raise ValueError("may contain only letters, digits and . _ : / -")
    if ".." in value or value.startswith("/"):
        raise ValueError("must not contain '..' or start with '/'")
    return value


def check_prompt(value: str) -> str:
    if len(value) > LIMITS.prompt_chars:
        raise ValueError(f"must be at most {LIMITS.prompt_chars} characters (got {len(value)})")
    bad = _BAD_PROMPT_CHARS.search(value)
    if bad:
        raise ValueError(f"contains a control character (U+{ord(bad.group()):04X} at position {bad.start()})")
    return value


def _check_id(value: str) -> str:
    if not value or len(value) > 128 or not _ID.match(value):
        raise ValueError("must be 1-128 characters of letters, digits and . _ : -")
    return value


def _check_device(value: str) -> str:
    if value == "cpu" or re.fullmatch(r"cuda:\d{1,2}", value):
        return value
    raise ValueError("must be 'cpu' or 'cuda:N'")


#: What the validators above check, said in the JSON schema too (OpenAPI clients and
#: generated tests see the rules; the validators stay the ones that give the messages).
_STRING_RULES: dict[str, dict[str, Any]] = {
    "model": {"pattern": _MODEL_REF.pattern, "maxLength": LIMITS.model_ref_chars},
    "alias": {"pattern": _MODEL_REF.pattern, "maxLength": LIMITS.model_ref_chars},
    "hive_id": {"pattern": r"^[A-Za-z0-9._:-]{1,128}$"},
    "worker_id": {"pattern": r"^[A-Za-z0-9._:-]{1,128}$"},
    "device": {"pattern": r"^(cpu|cuda:[0-9]{1,2})$"},
    "prompt": {"pattern": "^[^" + _BAD_PROMPT_CHARS.pattern[1:-1] + "]*$"},
    "content": {"pattern": "^[^" + _BAD_PROMPT_CHARS.pattern[1:-1] + "]*$"},
}


def _schema_rules(schema: dict[str, Any]) -> None:
    """``operation`` is required on the wire (it picks the model), and strings carry their rules."""
    properties = schema.get("properties", {})
    if "operation" in properties:
        required = schema.setdefault("required", [])
        if "operation" not in required:
            required.insert(0, "operation")
    for name, rules in _STRING_RULES.items():
        prop = properties.get(name)
        if prop is None:
            continue
        for branch in [prop, *prop.get("anyOf", ())]:
            if branch.get("type") == "string":
                branch.update(rules)


class OperationBase(BaseModel):
    """Fields and behaviour common to every operation."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, json_schema_extra=_schema_rules)

    #: Operations the queen forwards to the hive named by ``hive_id``.
    forwarded_to_hive: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return str(self.__dict__["operation"])

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class _HiveOperation(OperationBase):
    forwarded_to_hive: ClassVar[bool] = True

    hive_id: str = "localhost"

    _v_hive = field_validator("hive_id")(classmethod(lambda cls, v: _check_id(v)))


class Status(OperationBase):
    operation: Literal["status"] = "status"


class QueenCheck(OperationBase):
    operation: Literal["queen_check"] = "queen_check"


class HiveList(OperationBase):
    operation: Literal["hive_list"] = "hive_list"


CHAT_ROLES = ("system", "user", "assistant")


class ChatMessage(BaseModel):
    """One turn of a conversation; the worker applies the model's chat template."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, json_schema_extra=_schema_rules)

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _content(cls, v: str) -> str:
        return check_prompt(v)


class InfillFile(BaseModel):
    """A file given as context to a fill-in-the-middle prompt (llama.cpp's ``input_extra``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    filename: str = Field(default="", max_length=1_024)
    text: str

    @field_validator("filename", "text")
    @classmethod
    def _text(cls, v: str) -> str:
        return check_prompt(v)


def _infer_schema(schema: dict[str, Any]) -> None:
    _schema_rules(schema)
    schema["anyOf"] = [{"required": ["prompt"]}, {"required": ["messages"]}]


class Infer(OperationBase):
    """Generate text from ``prompt`` (raw text) or ``messages`` (a chat): exactly one of the two."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, json_schema_extra=_infer_schema)

    operation: Literal["infer"] = "infer"
    model: str = DEFAULT_MODEL
    # Declared before ``prompt`` so the prompt's validator sees it.
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=LIMITS.messages)
    prompt: str | None = Field(default=None, validate_default=True)
    max_tokens: int = Field(default=128, ge=1, le=LIMITS.max_tokens)
    #: No limit was asked for (OpenAI's chats, llama.cpp's ``n_predict`` -1): the worker
    #: generates until its slot's context is full, ``max_tokens`` becoming what the context
    #: leaves after the prompt (the value given counts only where no worker says better).
    to_the_context: bool = False
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, ge=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0, le=LIMITS.top_k)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    stop: list[str] = Field(default_factory=list, max_length=LIMITS.stop_strings)
    hive_id: str | None = None
    worker_id: str | None = None
    device: str | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=LIMITS.timeout_s)
    #: Accepted for compatibility with the seed's clients; rbee always streams.
    stream: bool = True
    #: How long the worker stays loaded once idle after this job, in seconds: -1 for ever,
    #: 0 stops it right after; None keeps the hive's default (5 minutes).
    keep_alive: float | None = Field(default=None, ge=-1, le=LIMITS.keep_alive_s)
    #: Token ids already generated for this input (the ``ids`` of its token events so far):
    #: the worker puts them after the prompt, counts them in ``max_tokens`` and streams only
    #: what follows. The queen uses it to carry a greedy job over to another worker.
    resume_tokens: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(
        default_factory=list, max_length=LIMITS.max_tokens
    )
    #: Candidates below this fraction of the likeliest token's probability are dropped (0: off).
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    #: OpenAI's penalties over the last tokens generated: a flat one for any token seen,
    #: one per time it was seen (0: off).
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    #: llama.cpp's repetition penalty: the logit of a token seen is divided by it (1: off).
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    #: Added to a token's logit before sampling (token id -> -100..100); the worker
    #: checks the ids against its vocabulary.
    logit_bias: dict[Annotated[int, Field(ge=0, le=2**31 - 1)], Annotated[float, Field(ge=-100.0, le=100.0)]] = Field(
        default_factory=dict, max_length=LIMITS.logit_bias
    )
    #: A GBNF grammar (llama.cpp's) the output must follow; the worker refuses one it cannot parse.
    grammar: str | None = Field(default=None, min_length=1, max_length=LIMITS.grammar_chars)
    #: A JSON schema the output must be an instance of (compiled to a grammar by the worker);
    #: ``{"type": "object"}`` asks for any JSON object. Not together with ``grammar``.
    json_schema: dict[str, Any] | None = None
    #: Send each generated token's log-probability and this many likeliest alternatives
    #: (the token event's ``lp``); None: none.
    logprobs: int | None = Field(default=None, ge=0, le=LIMITS.top_logprobs)
    #: Fill in the middle: the text after the cursor, ``prompt`` being the text before it.
    #: The worker builds the model's FIM prompt from its FIM tokens and refuses the job (422,
    #: naming ``suffix``) for a model that has none.
    suffix: str | None = None
    #: Tool definitions (OpenAI's ``{"type": "function", "function": {...}}``) the model's own
    #: chat template renders into the prompt (only with ``messages``; a family template that
    #: has no place for tools leaves them out).
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    #: Other files as context for a fill-in-the-middle prompt (only with ``suffix``).
    infill_files: list[InfillFile] = Field(default_factory=list, max_length=LIMITS.infill_files)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_model_ref(v)

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, v: float | None) -> float | None:
        if v is not None and v < 0 and v != -1:
            raise ValueError("must be -1 (for ever), 0 (stop after this job) or a number of seconds")
        return v

    @model_validator(mode="after")
    def _resume_fits(self) -> Infer:
        if len(self.resume_tokens) >= self.max_tokens and not self.to_the_context:
            raise ValueError(
                f"resume_tokens: {len(self.resume_tokens)} tokens already reach max_tokens ({self.max_tokens})"
            )
        if self.grammar is not None and self.json_schema is not None:
            raise ValueError("grammar: give either grammar or json_schema, not both")
        if self.suffix is not None and self.prompt is None:
            raise ValueError("suffix: fill in the middle takes a prompt (the text before), not messages")
        if self.tools is not None and self.messages is None:
            raise ValueError("tools: only with messages (a chat)")
        if self.infill_files and self.suffix is None:
            raise ValueError("infill_files: only with suffix (fill in the middle)")
        extra = len(self.suffix or "") + sum(len(f.text) + len(f.filename) for f in self.infill_files)
        if extra + len(self.prompt or "") > LIMITS.prompt_chars:
            raise ValueError(
                f"suffix: prompt, suffix and files must be at most {LIMITS.prompt_chars} characters together"
            )
        return self

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        return None if v is None else check_prompt(v)

    @field_validator("json_schema")
    @classmethod
    def _json_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return None
        try:
            size = len(json.dumps(v, ensure_ascii=False))
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"must be plain JSON: {exc}") from None
        if size > LIMITS.grammar_chars:
            raise ValueError(f"must be at most {LIMITS.grammar_chars} characters as JSON (got {size})")
        return v

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[ChatMessage] | None) -> list[ChatMessage] | None:
        if v is not None and sum(len(m.content) for m in v) > LIMITS.prompt_chars:
            raise ValueError(f"the messages' contents must be at most {LIMITS.prompt_chars} characters together")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | None, info: ValidationInfo) -> str | None:
        has_messages = info.data.get("messages") is not None
        if v is None:
            if not has_messages and "messages" in info.data:
                raise ValueError("Field required (give either prompt or messages)")
            return None
        if has_messages:
            raise ValueError("give either prompt or messages, not both")
        return check_prompt(v)

    @property
    def input_chars(self) -> int:
        """Characters of input: the prompt, or the messages' contents."""
        if self.messages is not None:
            return sum(len(m.content) for m in self.messages)
        return len(self.prompt or "")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str]) -> list[str]:
        for s in v:
            if not s or len(s) > LIMITS.stop_chars:
                raise ValueError(f"each stop string must be 1-{LIMITS.stop_chars} characters")
        return v

    @field_validator("hive_id", "worker_id")
    @classmethod
    def _ids(cls, v: str | None) -> str | None:
        return None if v is None else _check_id(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        return None if v is None else _check_device(v)


class HiveCheck(_HiveOperation):
    operation: Literal["hive_check"] = "hive_check"


class WorkerSpawn(_HiveOperation):
    operation: Literal["worker_spawn"] = "worker_spawn"
    model: str = DEFAULT_MODEL
    device: str = "cpu"

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_model_ref(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)


class WorkerList(_HiveOperation):
    operation: Literal["worker_list"] = "worker_list"


class WorkerGet(_HiveOperation):
    operation: Literal["worker_get"] = "worker_get"
    worker_id: str

    _v_worker = field_validator("worker_id")(classmethod(lambda cls, v: _check_id(v)))


class WorkerStop(_HiveOperation):
    operation: Literal["worker_stop"] = "worker_stop"
    worker_id: str

    _v_worker = field_validator("worker_id")(classmethod(lambda cls, v: _check_id(v)))


class WorkerStopAll(OperationBase):
    """Stop every worker (of ``model`` when given) on ``hive_id``, or on every hive when it is not given.

    The queen runs it on each hive concerned (a hive runs it for itself); the
    result lists the workers stopped. Jobs still running on them end as their
    worker was lost.
    """

    operation: Literal["worker_stop_all"] = "worker_stop_all"
    model: str | None = None
    hive_id: str | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        return None if v is None else check_model_ref(v)

    @field_validator("hive_id")
    @classmethod
    def _hive(cls, v: str | None) -> str | None:
        return None if v is None else _check_id(v)


class ModelList(_HiveOperation):
    operation: Literal["model_list"] = "model_list"


class ModelGet(_HiveOperation):
    operation: Literal["model_get"] = "model_get"
    model: str

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_model_ref(v)


class ModelDownload(_HiveOperation):
    operation: Literal["model_download"] = "model_download"
    source: str = Field(min_length=1, max_length=4096)
    alias: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str | None) -> str | None:
        return None if v is None else check_model_ref(v)


class ModelDelete(_HiveOperation):
    operation: Literal["model_delete"] = "model_delete"
    model: str

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_model_ref(v)


Operation = Annotated[
    Status
    | Infer
    | QueenCheck
    | HiveList
    | HiveCheck
    | WorkerSpawn
    | WorkerList
    | WorkerGet
    | WorkerStop
    | WorkerStopAll
    | ModelList
    | ModelGet
    | ModelDownload
    | ModelDelete,
    Field(discriminator="operation"),
]

#: What a hive runs (the queen forwards these to it).
HiveOperation = Annotated[
    HiveCheck
    | WorkerSpawn
    | WorkerList
    | WorkerGet
    | WorkerStop
    | WorkerStopAll
    | ModelList
    | ModelGet
    | ModelDownload
    | ModelDelete,
    Field(discriminator="operation"),
]

HIVE_OPERATIONS = frozenset(
    {
        "hive_check",
        "worker_spawn",
        "worker_list",
        "worker_get",
        "worker_stop",
        "worker_stop_all",
        "model_list",
        "model_get",
        "model_download",
        "model_delete",
    }
)

_ADAPTER: TypeAdapter[Any] = TypeAdapter(Operation)


def validation_problems(exc: ValidationError, *, strip_tag: bool = True) -> list[dict[str, str]]:
    """Turn a pydantic error into ``[{"field", "reason"}]`` a person can act on."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = list(err.get("loc", ()))
        if strip_tag and loc and isinstance(loc[0], str) and err.get("type") != "union_tag_invalid":
            loc = loc[1:]  # the union's tag ("infer") is not a field
        field = ".".join(str(p) for p in loc) or "operation"
        reason = err.get("msg", "invalid")
        etype = err.get("type")
        if etype == "union_tag_invalid":
            field = "operation"
            tag = err.get("ctx", {}).get("tag")
            reason = f"unknown operation {tag!r}; expected one of {err.get('ctx', {}).get('expected_tags')}"
        elif etype == "union_tag_not_found":
            field = "operation"
            reason = "missing the 'operation' field"
        elif etype == "extra_forbidden":
            reason = "unknown field"
        elif reason.startswith("Value error, "):
            reason = reason[len("Value error, ") :]
        problems.append({"field": field, "reason": reason})
    return problems


def parse_operation(raw: bytes | str | dict[str, Any]) -> OperationBase:
    """Parse and validate an operation, or raise :class:`InvalidOperation`."""
    try:
        op = _ADAPTER.validate_python(raw) if isinstance(raw, dict) else _ADAPTER.validate_json(raw)
    except ValidationError as exc:
        problems = validation_problems(exc)
        if problems and problems[0]["reason"].startswith("Invalid JSON"):
            problems = [{"field": "body", "reason": problems[0]["reason"]}]
        first = problems[0] if problems else {"field": "operation", "reason": "invalid"}
        message = "; ".join(f"{p['field']}: {p['reason']}" for p in problems)
        raise InvalidOperation(message, field=first["field"], problems=problems) from None
    assert isinstance(op, OperationBase)
    return op

"""The engines: what generates tokens for a worker.

An engine loads once, counts prompt tokens (cheap, used at admission) and
runs many generations at once. :meth:`Engine.submit` hands it one request
with a :class:`Sink`; the engine's own thread calls ``sink.post`` with what
happened in each step (a :class:`SlotStart`, text :class:`Piece` s, one
:class:`Finished`), and :meth:`SequenceHandle.cancel` asks it to stop.
:func:`rbee.worker.bridge.run_generation` is the asyncio side of that seam.

* :class:`LlamaEngine` is a continuous-batching engine on llama.cpp's batch
  API (:mod:`rbee.worker.batch`): one thread owns the ``llama_context`` and
  decodes one token for every running sequence plus a chunk of a starting
  prompt in each step; a slot keeps the KV of its last job for the next
  prompt that shares its prefix.
* A chat (``messages``) is turned into a prompt with the model's own template
  (the GGUF's ``tokenizer.chat_template``, through llama-cpp-python's chat
  handler, as ``create_chat_completion`` would) or, for a GGUF without one, its
  family's turn format (:mod:`rbee.chat_templates`: Gemma's, else ChatML).
* :class:`rbee.worker.fake.FakeEngine` is a scripted engine (pieces, per-token
  delay, failure after K tokens, slots) for fast tests and overhead benchmarks.
  It is never the default.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rbee.chat_templates import GGUF, render, template_for
from rbee.worker.schema import schema_grammar  # re-exported: the engine's grammars come from there

__all__ = [
    "STOP_REASONS",
    "ChatPrompt",
    "Engine",
    "Finished",
    "GenerationOutcome",
    "GenerationRequest",
    "LlamaEngine",
    "Piece",
    "SequenceHandle",
    "Sink",
    "SlotStart",
    "StopScanner",
    "generate",
    "parse_device",
    "parse_kv_override",
    "schema_grammar",
]

#: ``error`` is set only when the engine raised; the job then ends ``failed``.
STOP_REASONS = frozenset({"eos", "max_tokens", "stop", "cancelled", "error"})


@dataclass
class GenerationRequest:
    prompt: str
    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    #: A chat (``[{"role", "content"}]``) instead of ``prompt``; the engine applies the model's template.
    messages: list[dict[str, str]] | None = None
    #: Tokens already generated for this prompt (elsewhere): they go into the KV after the
    #: prompt, count towards ``max_tokens`` and are not sent again; generation goes on after them.
    resume: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    #: Token id -> added to its logit (ids below the vocabulary's size).
    logit_bias: dict[int, float] = field(default_factory=dict)
    #: A GBNF grammar (root rule ``root``) the output follows; see :func:`schema_grammar`.
    grammar: str | None = None
    #: Give each generated token's log-probability and this many likeliest alternatives
    #: (:attr:`Piece.lp`); None: none (the fast path: no logits row is read).
    logprobs: int | None = None
    #: Tool definitions for the model's own chat template (``messages`` only).
    tools: list[dict[str, Any]] | None = None
    #: Fill in the middle: ``prompt`` is the text before the cursor, this the text after it.
    suffix: str | None = None
    #: ``(filename, text)`` of other files given as context to a fill-in-the-middle prompt.
    infill_files: list[tuple[str, str]] = field(default_factory=list)

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repeat_penalty != 1.0


@dataclass
class ChatPrompt:
    """A chat rendered for one model: what ``create_chat_completion`` hands to ``create_completion``."""

    tokens: list[int]
    #: The caller's stop strings followed by the chat format's own.
    stop: list[str]
    #: The format's token-level stop test (llama-cpp-python's ``StoppingCriteriaList``), if any.
    stopping_criteria: Any = None


@dataclass
class GenerationOutcome:
    """Filled in by the engine while it generates (read after :class:`Finished` arrived)."""

    tokens_in: int = 0
    tokens_out: int = 0
    stop_reason: str = "cancelled"
    #: Time from submission until the first token was sampled (prompt
    #: evaluation), so the decode rate can leave it out.
    prefill_ms: float = 0.0
    #: Prompt tokens whose KV was already in the slot (not evaluated again).
    tokens_reused: int = 0
    #: The stop string that ended the answer (``stop_reason`` ``stop``), when one did.
    stop_sequence: str | None = None
    #: Of ``tokens_out``, those given as ``resume`` (generated before, elsewhere).
    tokens_resumed: int = 0
    slot: int = -1


@dataclass(frozen=True, slots=True)
class SlotStart:
    """The sequence has a slot; ``reused`` of its ``tokens_in`` prompt tokens come from the slot's cache."""

    slot: int
    reused: int
    tokens_in: int


@dataclass(frozen=True, slots=True)
class Piece:
    """Text to send, and the ids of the tokens generated since the previous piece.

    The ids include tokens whose text is still held back (a possible stop
    string, an unfinished UTF-8 character), so the ids of all pieces sent so
    far, given back as ``resume``, put a sequence exactly where it was.
    """

    text: str
    ids: tuple[int, ...] = ()
    #: With ``logprobs``: one entry per id, OpenAI's chat shape
    #: (``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}``).
    lp: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """The last item of a sequence. ``error`` is set when the engine failed it."""

    error: BaseException | None = None


class Sink(Protocol):
    def post(self, items: list[Any]) -> None:
        """Called on the engine's thread with one step's items for this sequence, in order."""
        ...


class SequenceHandle(Protocol):
    def cancel(self) -> None:
        """Stop the sequence; the engine frees its slot within one step and posts :class:`Finished`."""
        ...


class Engine(Protocol):
    model_id: str
    #: The context of one slot, in tokens: a prompt plus ``max_tokens`` must fit in it.
    n_ctx: int
    #: How many generations may run at once on this engine.
    max_slots: int
    #: Token ids are ``0 <= id < n_vocab``.
    n_vocab: int
    #: The chat template chats are rendered with (``gguf``, ``gemma``, ``chatml``; see rbee.chat_templates).
    chat_template: str

    def load(self) -> None: ...

    def close(self) -> None: ...

    def count_tokens(self, prompt: str) -> int: ...

    def count_chat_tokens(self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None) -> int:
        """Prompt tokens of a chat; raises ``ValueError`` for a chat the model's template refuses."""
        ...

    def submit(self, req: GenerationRequest, outcome: GenerationOutcome, sink: Sink) -> SequenceHandle: ...

    def check_grammar(self, grammar: str) -> None:
        """Raises ``ValueError`` (with the parser's reason) for a GBNF grammar this engine cannot use."""
        ...

    def infill_tokens(self, prefix: str, suffix: str, files: Sequence[tuple[str, str]] = ()) -> list[int]:
        """A fill-in-the-middle prompt; ``ValueError`` for a model without FIM tokens."""
        ...

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """``text``'s token ids (llama.cpp server's ``/tokenize``: BOS/EOS only with ``add_special``)."""
        ...

    def token_piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens as their text)."""
        ...

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens`` (special tokens as their text); ids must be below ``n_vocab``."""
        ...

    #: The length of an embedding vector, and the most tokens one input to :meth:`embed` may have.
    n_embd: int
    n_ctx_embed: int

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """One mean-pooled unit vector per input of token ids; blocks, callable from any thread."""
        ...


def parse_device(device: str) -> tuple[int, int]:
    """``cpu`` -> no offload; ``cuda:N`` -> every layer on GPU N. Returns (n_gpu_layers, main_gpu)."""
    if device == "cpu":
        return 0, 0
    prefix, _, index = device.partition(":")
    if prefix == "cuda" and index.isdigit():
        return -1, int(index)
    raise ValueError(f"device must be 'cpu' or 'cuda:N', not {device!r}")


def repack_default(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Repack weights, except on CPUs with Intel AMX.

    On an AMX CPU llama.cpp repacks into its AMX layout, and the AMX matrix
    kernels of the llama.cpp that llama-cpp-python 0.3.36 vendors crash the
    process at the first decode (seen on a 2-core Xeon VM, in llama-cpp-python
    and in llama.cpp's own ``llama-batched-bench`` alike; ``--no-repack`` runs).
    """
    try:
        flags = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return True
    return " amx_tile" not in flags and " amx_int8" not in flags


class StopScanner:
    """Finds stop strings in streamed text without ever emitting one.

    Only the tail that could still grow into a stop string is held back; the
    rest is released at once.
    """

    __slots__ = ("_pending", "_stops", "matched")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        #: The stop string that was reached (the earliest in the text), once one was.
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        if not self._stops:
            return text, False
        buf = self._pending + text
        hits = [(i, s) for s in self._stops if (i := buf.find(s)) >= 0]
        if hits:
            self._pending = ""
            at, self.matched = min(hits, key=lambda hit: hit[0])
            return buf[:at], True
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        cut = len(buf) - hold
        self._pending = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        """The held-back tail, once generation ended for another reason."""
        tail, self._pending = self._pending, ""
        return tail


class _QueueSink:
    """A sink for blocking callers (tests, in-process benchmarks): items land in a ``queue.Queue``."""

    def __init__(self) -> None:
        self.items: queue.Queue[Any] = queue.Queue()

    def post(self, items: list[Any]) -> None:
        for item in items:
            self.items.put(item)


def generate(
    engine: Engine,
    req: GenerationRequest,
    outcome: GenerationOutcome | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[str]:
    """Run one request on ``engine`` from a plain thread: yields its pieces, raises what the engine raised."""
    outcome = outcome if outcome is not None else GenerationOutcome()
    sink = _QueueSink()
    handle = engine.submit(req, outcome, sink)
    finished = False
    try:
        while True:
            try:
                item = sink.items.get(timeout=0.05)
            except queue.Empty:
                if should_stop():
                    handle.cancel()
                continue
            if isinstance(item, Finished):
                finished = True
                if item.error is not None:
                    raise item.error
                return
            if isinstance(item, Piece):
                yield item.text
                if should_stop():
                    handle.cancel()
    finally:
        if not finished:
            handle.cancel()


class LlamaEngine:
    """One GGUF model in llama.cpp, serving ``slots`` sequences at once from one batch loop.

    The model's tokenizer and chat machinery come from a ``llama_cpp.Llama``
    with a minimal context of its own; generation runs in a separate
    ``llama_context`` with one KV stream per slot, driven by
    :class:`rbee.worker.batch.BatchLoop` on the engine's thread.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        model_id: str | None = None,
        n_ctx: int = 4096,
        slots: int = 4,
        n_threads: int | None = None,
        device: str = "cpu",
        chunk: int = 512,
        repack: bool | None = None,
        batch_invariant: bool = True,
        kv_overrides: dict[str, bool | int | float | str] | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        #: GGUF metadata values that replace the file's at load (llama.cpp's ``--override-kv``).
        self.kv_overrides = dict(kv_overrides or {})
        self.model_path = Path(model_path)
        self.model_id = model_id or self.model_path.stem
        self.n_ctx = n_ctx
        self.max_slots = slots
        self.n_vocab = 0
        self.chat_template = "chatml"
        self.n_threads = n_threads
        self.device = device
        self.chunk = chunk
        #: Weight repacking into llama.cpp's faster CPU layouts (its "extra buffer types").
        self.repack = repack_default() if repack is None else repack
        self.batch_invariant = batch_invariant
        self.n_gpu_layers, self.main_gpu = parse_device(device)
        self._llm: Any = None
        self._model: Any = None
        self._loop: Any = None
        self._embedder: Any = None
        self._embed_lock = threading.Lock()
        self.n_embd = 0
        #: The most tokens one input to :meth:`embed` may have: a slot's context.
        self.n_ctx_embed = n_ctx

    def load(self) -> None:
        import llama_cpp

        from rbee.worker.batch import BatchLoop

        if self.n_gpu_layers and not llama_cpp.llama_supports_gpu_offload():
            # Without this check llama.cpp quietly runs on the CPU instead.
            raise RuntimeError(f"device {self.device} was asked for, but this llama-cpp-python has no GPU support")
        if self.batch_invariant:
            # ggml's tiled CPU matmul, taken for batches of several rows, sums in another
            # order than the one-row path, so a greedy answer would depend on which other
            # sequences shared its steps (3 of 8 prompts changed with three neighbours).
            # Without it the answer is the same alone, warm and in any batch; prompt
            # evaluation is about 20 % slower, generation is not (docs/benchmarks.md).
            # ggml reads the switch once, at the process's first matmul. (Flash attention
            # stays on: its CPU kernel tiles 64 or more queries, so a long prompt's last
            # token can come out differently cold, among the prompt's queries, than warm,
            # alone; turning it off cost 4-9 % of generation, docs/benchmarks.md.)
            os.environ.setdefault("GGML_CPU_TILED_MM", "0")
        # The tokenizer and chat templates: the vocabulary only, no weights.
        self._llm = llama_cpp.Llama(
            model_path=str(self.model_path),
            vocab_only=True,
            n_ctx=64,
            n_batch=8,
            n_threads=1,
            verbose=False,
            kv_overrides=self.kv_overrides or None,
        )
        params = llama_cpp.llama_model_default_params()
        if self.kv_overrides:
            self._overrides = _kv_override_array(self.kv_overrides)  # kept alive while loading
            params.kv_overrides = self._overrides
        params.n_gpu_layers = self.n_gpu_layers
        params.main_gpu = self.main_gpu
        params.use_extra_bufts = self.repack
        model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(), params)
        if not model:
            self.close()
            raise RuntimeError(f"llama.cpp could not load {self.model_path}")
        self._model = model
        try:
            self._loop = BatchLoop(
                model,
                slots=self.max_slots,
                n_ctx_slot=self.n_ctx,
                n_threads=self.n_threads,
                chunk=self.chunk,
                name=f"rbee-engine:{self.model_id}",
            )
        except BaseException:
            self.close()
            raise
        self.n_ctx = self._loop.n_ctx_slot
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._loop.vocab))
        self.n_embd = int(llama_cpp.llama_model_n_embd(model))
        self.n_ctx_embed = self.n_ctx
        metadata = self._llm.metadata
        self.chat_template = template_for(
            metadata.get("general.architecture"), bool(metadata.get("tokenizer.chat_template"))
        )

    def close(self) -> None:
        import llama_cpp

        if self._loop is not None:
            self._loop.close()
            self._loop = None
        with self._embed_lock:
            if self._embedder is not None:
                self._embedder.close()  # waits for an embedding in progress
                self._embedder = None
            if self._model is not None:
                llama_cpp.llama_model_free(self._model)
                self._model = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    @property
    def batch(self) -> Any:
        """The batch loop (its step trace and slot caches are what the tests look at)."""
        if self._loop is None:
            raise RuntimeError("the model is not loaded")
        return self._loop

    def prompt_tokens(self, prompt: str) -> list[int]:
        """The prompt as ``create_completion`` tokenizes it (BOS/CLS, special tokens, EOS/SEP)."""
        llm = self._llm
        if llm is None:
            raise RuntimeError("the model is not loaded")
        model = llm._model
        bos = llm.token_bos()
        cls, sep = model.token_cls(), model.token_sep()
        head = [cls if cls != -1 else bos]
        tail = [sep if sep != -1 else llm.token_eos()]
        if not model.add_bos_token() or head[0] == -1:
            head = []
        if not model.add_eos_token() and sep == -1:
            tail = []
        body = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) if prompt else []
        return head + body + tail

    def count_tokens(self, prompt: str) -> int:
        return len(self.prompt_tokens(prompt))

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        llm = self._llm
        if llm is None:
            raise RuntimeError("the model is not loaded")
        return [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)]

    def token_piece(self, token: int) -> bytes:
        import ctypes

        import llama_cpp

        vocab = self.batch.vocab
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)]

    def detokenize(self, tokens: Sequence[int]) -> str:
        import ctypes

        import llama_cpp

        if not tokens:
            return ""
        vocab = self.batch.vocab
        ids = (llama_cpp.llama_token * len(tokens))(*tokens)
        size = max(64, 8 * len(tokens))
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_detokenize(vocab, ids, len(tokens), buf, size, False, True)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n
        raise RuntimeError("llama.cpp could not detokenize the tokens")  # pragma: no cover

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """On a context of its own (:class:`rbee.worker.embed.Embedder`), made at the first call."""
        from rbee.worker.embed import Embedder

        with self._embed_lock:
            if self._model is None:
                raise RuntimeError("the model is not loaded")
            if self._embedder is None:
                self._embedder = Embedder(self._model, n_ctx=self.n_ctx_embed, n_threads=self.n_threads)
            embedder = self._embedder
        vectors: list[list[float]] = embedder.embed(inputs)
        return vectors

    def chat_prompt(
        self,
        messages: list[dict[str, str]],
        stop: Sequence[str] = (),
        tools: list[dict[str, Any]] | None = None,
    ) -> ChatPrompt:
        """Render a chat with the model's template (:attr:`chat_template`).

        With the GGUF's own template, the model's chat handler runs as it would
        inside ``create_chat_completion``, against a stand-in for the model that
        records the ``create_completion`` call it makes instead of generating:
        that call holds the prompt tokens, the stop strings and the stopping
        criteria. A family's template is rendered here and tokenized with its
        special tokens.
        """
        llm = self._llm
        if llm is None:
            raise RuntimeError("the model is not loaded")
        if self.chat_template != GGUF:
            chat = render(self.chat_template, messages)
            ends = {self._special_id(t) for t in chat.stop_tokens} - {None}
            return ChatPrompt(
                tokens=self.prompt_tokens(chat.text),
                stop=[*stop, *chat.stop],
                stopping_criteria=_EndsWith(ends) if ends else None,
            )
        from llama_cpp import llama_chat_format

        handler: Any = (
            llm.chat_handler
            or llm._chat_handlers.get(llm.chat_format)
            or llama_chat_format.get_chat_completion_handler(llm.chat_format)
        )
        recorder = _CompletionRecorder(llm)
        # stream=True: the handler wraps the (empty) completion lazily and returns.
        try:
            handler(llama=recorder, messages=[dict(m) for m in messages], stop=list(stop), tools=tools, stream=True)
        except Exception as exc:  # a template's raise_exception, a Jinja error: the chat is refused
            raise ValueError(f"{type(exc).__name__}: {exc}") from exc
        call = recorder.call
        if call is None:
            raise ValueError(f"the chat format {llm.chat_format!r} of this model cannot be used for chats here")
        prompt = call.get("prompt")
        tokens = self.prompt_tokens(prompt) if isinstance(prompt, str) else list(prompt or [])
        stops = call.get("stop") or []
        return ChatPrompt(
            tokens=tokens,
            stop=[stops] if isinstance(stops, str) else list(stops),
            stopping_criteria=call.get("stopping_criteria"),
        )

    def count_chat_tokens(self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None) -> int:
        return len(self.chat_prompt(messages, tools=tools).tokens)

    def _special_id(self, text: str) -> int | None:
        """The id of a special token written as ``text``, if the vocabulary has it as one token."""
        ids = self._llm.tokenize(text.encode(), add_bos=False, special=True)
        return int(ids[0]) if len(ids) == 1 else None

    def infill_tokens(self, prefix: str, suffix: str, files: Sequence[tuple[str, str]] = ()) -> list[int]:
        """The model's fill-in-the-middle prompt, in llama.cpp's server's layout: BOS, then
        with other files a repository header (FIM_REP) and each file after FIM_SEP and its
        name, then FIM_PRE prefix FIM_SUF suffix FIM_MID. The texts are tokenized without
        special tokens, so code that spells one out stays text."""
        import llama_cpp

        vocab = self.batch.vocab
        pre, suf, mid = (
            int(llama_cpp.llama_vocab_fim_pre(vocab)),
            int(llama_cpp.llama_vocab_fim_suf(vocab)),
            int(llama_cpp.llama_vocab_fim_mid(vocab)),
        )
        if -1 in (pre, suf, mid):
            raise ValueError(
                f"{self.model_id} has no fill-in-the-middle tokens (FIM prefix, suffix and middle); "
                "infill needs a code model trained for it"
            )

        def text(s: str) -> list[int]:
            return self.tokenize(s, add_special=False, parse_special=False) if s else []

        tokens: list[int] = []
        if llama_cpp.llama_vocab_get_add_bos(vocab):
            tokens.append(int(llama_cpp.llama_vocab_bos(vocab)))
        if files:
            rep, sep = int(llama_cpp.llama_vocab_fim_rep(vocab)), int(llama_cpp.llama_vocab_fim_sep(vocab))
            if rep != -1:
                tokens += [rep, *text("project\n")]
            for filename, body in files:
                if sep != -1:
                    tokens += [sep, *text(f"{filename or 'file'}\n")]
                else:
                    tokens += text(f"\n\n--- {filename or 'snippet'} ---\n\n")
                tokens += text(body)
            if sep != -1:
                tokens += [sep, *text("current\n")]
        return [*tokens, pre, *text(prefix), suf, *text(suffix), mid]

    def check_grammar(self, grammar: str) -> None:
        import llama_cpp

        loop = self._loop
        if loop is None:
            raise RuntimeError("the model is not loaded")
        sampler = llama_cpp.llama_sampler_init_grammar(loop.vocab, grammar.encode(), b"root")
        if not sampler:
            raise ValueError(
                "llama.cpp could not parse it as a GBNF grammar with a root rule"
                " (a syntax error, an undefined or left-recursive rule)"
            )
        llama_cpp.llama_sampler_free(sampler)

    def submit(self, req: GenerationRequest, outcome: GenerationOutcome, sink: Sink) -> SequenceHandle:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the model is not loaded")
        criteria = None
        if req.messages is not None:
            chat = self.chat_prompt(req.messages, req.stop, req.tools)
            tokens, stops, criteria = chat.tokens, chat.stop, chat.stopping_criteria
        elif req.suffix is not None:
            tokens, stops = self.infill_tokens(req.prompt, req.suffix, req.infill_files), list(req.stop)
        else:
            tokens, stops = self.prompt_tokens(req.prompt), list(req.stop)
        # create_completion starts an empty prompt's completion with BOS, and
        # its detokenisation then drops one leading space of the text.
        strip_space = req.messages is None and not req.prompt
        handle: SequenceHandle = loop.submit(
            req, tokens, stops, outcome, sink, stopping_criteria=criteria, strip_space=strip_space
        )
        return handle


def _kv_override_array(overrides: dict[str, bool | int | float | str]) -> Any:
    """``overrides`` as llama.cpp's ``llama_model_kv_override`` array (ended by an empty key)."""
    import llama_cpp

    array = (llama_cpp.llama_model_kv_override * (len(overrides) + 1))()
    for entry, (key, value) in zip(array, overrides.items(), strict=False):
        entry.key = key.encode()
        if isinstance(value, bool):
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL
            entry.value.val_bool = value
        elif isinstance(value, int):
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            entry.value.val_i64 = value
        elif isinstance(value, float):
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT
            entry.value.val_f64 = value
        else:
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            entry.value.val_str = value.encode()[:127]
    array[-1].key = b"\0"
    return array


def parse_kv_override(text: str) -> tuple[str, bool | int | float | str]:
    """``KEY=TYPE:VALUE`` (llama.cpp's ``--override-kv``; TYPE is int, float, bool or str)."""
    key, eq, rest = text.partition("=")
    kind, colon, value = rest.partition(":")
    if not key or not eq or not colon or kind not in ("int", "float", "bool", "str"):
        raise ValueError(f"{text!r}: expected KEY=TYPE:VALUE with TYPE int, float, bool or str")
    if len(key) > 127:
        raise ValueError(f"{text!r}: the key is longer than 127 bytes")
    try:
        if kind == "int":
            return key, int(value)
        if kind == "float":
            return key, float(value)
    except ValueError:
        raise ValueError(f"{text!r}: {value!r} is not a{'n' if kind == 'int' else ''} {kind}") from None
    if kind == "bool":
        if value not in ("true", "false"):
            raise ValueError(f"{text!r}: a bool is true or false")
        return key, value == "true"
    if len(value.encode()) > 127:
        raise ValueError(f"{text!r}: a str value is at most 127 bytes")
    return key, value


class _EndsWith:
    """A token-level stop test: the answer ends when the model samples one of ``ids``."""

    __slots__ = ("ids",)

    def __init__(self, ids: set[int | None]) -> None:
        self.ids = {i for i in ids if i is not None}

    def __call__(self, tokens: Any, logits: Any) -> bool:
        return len(tokens) > 0 and int(tokens[-1]) in self.ids


class _CompletionRecorder:
    """Stands in for a ``Llama`` inside a chat handler and records its ``create_completion`` call."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self.call: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, prompt: Any = None, **kwargs: Any) -> Iterator[Any]:
        self.call = {"prompt": prompt, **kwargs}
        return iter(())

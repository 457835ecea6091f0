"""The engine seam: what the worker needs from whatever generates tokens.

An :class:`Engine` loads once, counts prompt tokens (cheap, used at admission)
and generates text pieces for one request at a time. ``generate`` is a
blocking iterator; it runs in the worker's generation thread behind
:func:`rbee.worker.bridge.run_generation`, which is the only code that
touches threads.

* :class:`LlamaEngine` drives llama-cpp-python at token level with exactly the
  sampler settings ``Llama.create_completion`` uses by default, so greedy
  output through rbee equals ``create_completion(prompt, temperature=0)``.
* A chat (``messages``) is turned into a prompt by llama-cpp-python's own
  chat machinery, the handler ``Llama.create_chat_completion`` would use for
  the model (its ``chat_format``, the GGUF's template, or the fallback), so
  greedy chat output through rbee equals ``create_chat_completion``.
* :class:`FakeEngine` is a scripted engine (pieces, per-token delay, failure
  after K tokens) for fast tests and overhead benchmarks. It is never the
  default.
"""

from __future__ import annotations

import codecs
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "STOP_REASONS",
    "ChatPrompt",
    "Engine",
    "FakeEngine",
    "GenerationOutcome",
    "GenerationRequest",
    "LlamaEngine",
    "StopScanner",
    "parse_device",
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
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    #: A chat (``[{"role", "content"}]``) instead of ``prompt``; the engine applies the model's template.
    messages: list[dict[str, str]] | None = None


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
    """Filled in by the engine while it generates (read after it returns or is stopped)."""

    tokens_in: int = 0
    tokens_out: int = 0
    stop_reason: str = "cancelled"
    #: Time from the start of ``generate`` until the first token was sampled
    #: (prompt evaluation), so the decode rate can leave it out.
    prefill_ms: float = 0.0


class Engine(Protocol):
    model_id: str
    n_ctx: int
    #: How many generations may run at once on this engine.
    max_slots: int

    def load(self) -> None: ...

    def count_tokens(self, prompt: str) -> int: ...

    def count_chat_tokens(self, messages: list[dict[str, str]]) -> int:
        """Prompt tokens of a chat; raises ``ValueError`` for a chat the model's template refuses."""
        ...

    def generate(
        self, req: GenerationRequest, should_stop: Callable[[], bool], outcome: GenerationOutcome
    ) -> Iterator[str]: ...


def parse_device(device: str) -> tuple[int, int]:
    """``cpu`` -> no offload; ``cuda:N`` -> every layer on GPU N. Returns (n_gpu_layers, main_gpu)."""
    if device == "cpu":
        return 0, 0
    prefix, _, index = device.partition(":")
    if prefix == "cuda" and index.isdigit():
        return -1, int(index)
    raise ValueError(f"device must be 'cpu' or 'cuda:N', not {device!r}")


class StopScanner:
    """Finds stop strings in streamed text without ever emitting one.

    Only the tail that could still grow into a stop string is held back; the
    rest is released at once.
    """

    __slots__ = ("_pending", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        if not self._stops:
            return text, False
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return buf[: min(hits)], True
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


class LlamaEngine:
    """One GGUF model in llama-cpp-python, generating at token level."""

    max_slots = 1  # a llama_context serves one sequence here; concurrent use is unsafe

    def __init__(
        self,
        model_path: str | Path,
        *,
        model_id: str | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        device: str = "cpu",
    ) -> None:
        self.model_path = Path(model_path)
        self.model_id = model_id or self.model_path.stem
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.device = device
        self.n_gpu_layers, self.main_gpu = parse_device(device)
        self._llm: Any = None
        self._llama_cpp: Any = None

    def load(self) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        if self.n_gpu_layers and not llama_cpp.llama_supports_gpu_offload():
            # Without this check llama.cpp quietly runs on the CPU instead.
            raise RuntimeError(f"device {self.device} was asked for, but this llama-cpp-python has no GPU support")
        self._llm = llama_cpp.Llama(
            model_path=str(self.model_path),
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            n_gpu_layers=self.n_gpu_layers,
            main_gpu=self.main_gpu,
            verbose=False,
        )
        self.n_ctx = int(self._llm.n_ctx())

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

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

    def chat_prompt(self, messages: list[dict[str, str]], stop: Sequence[str] = ()) -> ChatPrompt:
        """Render a chat exactly as ``create_chat_completion`` does for this model.

        The model's chat handler runs as it would inside ``create_chat_completion``,
        against a stand-in for the model that records the ``create_completion``
        call it makes instead of generating: that call holds the prompt tokens,
        the stop strings and the stopping criteria.
        """
        llm = self._llm
        if llm is None:
            raise RuntimeError("the model is not loaded")
        from llama_cpp import llama_chat_format

        handler: Any = (
            llm.chat_handler
            or llm._chat_handlers.get(llm.chat_format)
            or llama_chat_format.get_chat_completion_handler(llm.chat_format)
        )
        recorder = _CompletionRecorder(llm)
        # stream=True: the handler wraps the (empty) completion lazily and returns.
        try:
            handler(llama=recorder, messages=[dict(m) for m in messages], stop=list(stop), stream=True)
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

    def count_chat_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.chat_prompt(messages).tokens)

    def generate(
        self, req: GenerationRequest, should_stop: Callable[[], bool], outcome: GenerationOutcome
    ) -> Iterator[str]:
        llm = self._llm
        if llm is None:
            raise RuntimeError("the model is not loaded")
        is_eog = self._llama_cpp.llama_vocab_is_eog
        vocab = llm._model.vocab
        stopping_criteria = None
        if req.messages is not None:
            chat = self.chat_prompt(req.messages, req.stop)
            tokens, stop_strings, stopping_criteria = chat.tokens, chat.stop, chat.stopping_criteria
        else:
            tokens, stop_strings = self.prompt_tokens(req.prompt), req.stop
        outcome.tokens_in = len(tokens)
        outcome.stop_reason = "cancelled"
        llm.set_seed(req.seed if req.seed is not None else random.randint(0, 2**32 - 1))
        if req.temperature == 0 or req.seed is not None:
            # A request that asks for a reproducible answer (greedy, or seeded) is
            # evaluated from a clean state. llama.cpp's logits depend on how the
            # prompt is batched, so reusing the previous request's cached prefix
            # (what Llama.generate does) would make the answer depend on whatever
            # ran before; from scratch it equals a fresh create_completion. Other
            # requests keep the prefix cache, which spares long shared prompts
            # (a growing chat) their re-evaluation.
            llm.reset()
        # Decoding errors are dropped, as create_completion does with the full text.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        stops = StopScanner(stop_strings)
        # create_completion starts an empty prompt's completion with BOS, and
        # detokenize() then drops one leading space of the text.
        strip_space = req.messages is None and not req.prompt
        started = time.perf_counter()
        extra: dict[str, Any] = {} if stopping_criteria is None else {"stopping_criteria": stopping_criteria}
        tokens_iter = llm.generate(
            tokens,
            top_k=req.top_k,
            top_p=req.top_p,
            min_p=0.05,
            typical_p=1.0,
            temp=req.temperature,
            repeat_penalty=1.0,
            frequency_penalty=0.0,
            presence_penalty=0.0,
            tfs_z=1.0,
            mirostat_mode=0,
            mirostat_tau=5.0,
            mirostat_eta=0.1,
            **extra,
        )
        try:
            while True:
                if outcome.tokens_out >= req.max_tokens:
                    outcome.stop_reason = "max_tokens"
                    break
                if should_stop():
                    outcome.stop_reason = "cancelled"
                    return
                token = next(tokens_iter, None)
                if token is None:  # the chat format's stopping criteria ended it
                    outcome.stop_reason = "stop"
                    break
                if outcome.tokens_out == 0:
                    outcome.prefill_ms = (time.perf_counter() - started) * 1000.0
                if is_eog(vocab, token):
                    outcome.stop_reason = "eos"
                    break
                outcome.tokens_out += 1
                raw = llm.detokenize([token])
                if strip_space and outcome.tokens_out == 1 and raw.startswith(b" "):
                    raw = raw[1:]
                text, hit = stops.feed(decoder.decode(raw))
                if text:
                    yield text
                if hit:
                    outcome.stop_reason = "stop"
                    return
            text, hit = stops.feed(decoder.decode(b"", final=True))
            tail = text if hit else text + stops.flush()
            if hit:
                outcome.stop_reason = "stop"
            if tail:
                yield tail
        finally:
            tokens_iter.close()


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


class FakeEngine:
    """A scripted engine: deterministic pieces, optional delay and failure.

    For tests and for measuring rbee's own overhead; never a default.
    ``generated`` counts every piece produced across all requests, so a test
    can check that a cancelled generation really stopped.
    """

    max_slots = 1 << 16

    def __init__(
        self,
        *,
        tokens: int = 16,
        pieces: Sequence[str] | None = None,
        delay_ms: float = 0.0,
        fail_after: int | None = None,
        model_id: str = "fake-model",
        n_ctx: int = 4096,
        load_gate: threading.Event | None = None,
        fail_load: str | None = None,
    ) -> None:
        self.pieces = list(pieces) if pieces is not None else [f"tok{i} " for i in range(tokens)]
        self.delay_s = delay_ms / 1000.0
        self.fail_after = fail_after
        self.model_id = model_id
        self.n_ctx = n_ctx
        self.load_gate = load_gate
        self.fail_load = fail_load
        self.loaded = False
        self.generated = 0
        self._lock = threading.Lock()

    def load(self) -> None:
        if self.load_gate is not None:
            self.load_gate.wait()
        if self.fail_load is not None:
            raise RuntimeError(self.fail_load)
        self.loaded = True

    def count_tokens(self, prompt: str) -> int:
        return len(prompt.split())

    @staticmethod
    def chat_text(messages: list[dict[str, str]]) -> str:
        """A plain stand-in for a chat template: one ``role: content`` line per turn."""
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def count_chat_tokens(self, messages: list[dict[str, str]]) -> int:
        return self.count_tokens(self.chat_text(messages))

    def generate(
        self, req: GenerationRequest, should_stop: Callable[[], bool], outcome: GenerationOutcome
    ) -> Iterator[str]:
        if req.messages is not None:
            outcome.tokens_in = self.count_chat_tokens(req.messages)
        else:
            outcome.tokens_in = self.count_tokens(req.prompt)
        outcome.stop_reason = "cancelled"
        stops = StopScanner(req.stop)
        started = time.perf_counter()
        for piece in self.pieces:
            if outcome.tokens_out >= req.max_tokens:
                outcome.stop_reason = "max_tokens"
                break
            if should_stop():
                return
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.fail_after is not None and outcome.tokens_out >= self.fail_after:
                raise RuntimeError(f"scripted failure after {self.fail_after} tokens")
            if outcome.tokens_out == 0:
                outcome.prefill_ms = (time.perf_counter() - started) * 1000.0
            outcome.tokens_out += 1
            with self._lock:
                self.generated += 1
            text, hit = stops.feed(piece)
            if text:
                yield text
            if hit:
                outcome.stop_reason = "stop"
                return
        else:
            outcome.stop_reason = "eos"
        tail = stops.flush()
        if tail:
            yield tail

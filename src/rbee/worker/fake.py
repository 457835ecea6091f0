"""A scripted engine for fast tests and for measuring rbee's own overhead; never a default.

It keeps the :class:`~rbee.worker.engine.Engine` contract (admission counts,
chat and fill-in-the-middle prompts, grammars, log-probabilities, resumed
tokens, slots) with deterministic pieces instead of a model: piece ``k`` of
its script is token id ``k``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from rbee.worker.engine import (
    Finished,
    GenerationOutcome,
    GenerationRequest,
    Piece,
    SequenceHandle,
    Sink,
    SlotStart,
    StopScanner,
)

__all__ = ["FakeEngine"]


class _FakeSequence:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class FakeEngine:
    """A scripted engine: deterministic pieces, optional delay and failure, ``slots`` at once.

    For tests and for measuring rbee's own overhead; never a default. Each
    sequence runs on a thread of its own (named ``rbee-fake:N``).
    ``generated`` counts every piece produced across all requests, so a test
    can check that a cancelled generation really stopped; ``running`` and
    ``peak`` count sequences in flight.
    """

    def __init__(
        self,
        *,
        tokens: int = 16,
        pieces: Sequence[str] | None = None,
        delay_ms: float = 0.0,
        fail_after: int | None = None,
        model_id: str = "fake-model",
        n_ctx: int = 4096,
        slots: int = 1 << 16,
        load_gate: threading.Event | None = None,
        fail_load: str | None = None,
        fim: bool = False,
    ) -> None:
        #: Whether the fake model has fill-in-the-middle tokens.
        self.fim = fim
        self.pieces = list(pieces) if pieces is not None else [f"tok{i} " for i in range(tokens)]
        self.delay_s = delay_ms / 1000.0
        self.fail_after = fail_after
        self.model_id = model_id
        self.n_ctx = n_ctx
        self.n_vocab = len(self.pieces)
        self.chat_template = "fake"
        self.n_embd = 8
        self.n_ctx_embed = n_ctx
        self.max_slots = slots
        self.load_gate = load_gate
        self.fail_load = fail_load
        self.loaded = False
        self.generated = 0
        self.running = 0
        self.peak = 0
        #: The last request submitted (what the tests check reached the engine).
        self.last_request: GenerationRequest | None = None
        self._lock = threading.Lock()
        self._count = 0

    def load(self) -> None:
        if self.load_gate is not None:
            self.load_gate.wait()
        if self.fail_load is not None:
            raise RuntimeError(self.fail_load)
        self.loaded = True

    def close(self) -> None:
        pass

    def count_tokens(self, prompt: str) -> int:
        return len(prompt.split())

    @staticmethod
    def chat_text(messages: list[dict[str, str]]) -> str:
        """A plain stand-in for a chat template: one ``role: content`` line per turn."""
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def count_chat_tokens(self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None) -> int:
        return self.count_tokens(self.chat_text(messages))

    def infill_tokens(self, prefix: str, suffix: str, files: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Fake FIM prompt: the words of the files, the prefix and the suffix, plus three markers."""
        if not self.fim:
            raise ValueError(f"{self.model_id} has no fill-in-the-middle tokens (FIM prefix, suffix and middle)")
        words = " ".join([*(f"{name} {body}" for name, body in files), prefix, suffix])
        return [1, *self.tokenize(words), 2, 3]

    def check_grammar(self, grammar: str) -> None:
        """Only a stand-in for llama.cpp's parser: a grammar needs a ``root ::=`` rule."""
        if "root ::=" not in grammar:
            raise ValueError("the grammar has no root rule")

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Fake tokens: one per whitespace-separated word, its CRC-32 modulo ``n_vocab``; a fake BOS 0."""
        import zlib

        ids = [zlib.crc32(word.encode()) % self.n_vocab for word in text.split()]
        return [0, *ids] if add_special else ids

    def token_piece(self, token: int) -> bytes:
        """Fake pieces: token ``k`` is piece ``k`` of the script."""
        return self.pieces[token].encode()

    def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(self.pieces[t] for t in tokens)

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """Fake embeddings: a unit vector of ``n_embd`` numbers drawn from a hash of the token ids."""
        import hashlib
        import math

        vectors = []
        for tokens in inputs:
            digest = hashlib.sha256(",".join(map(str, tokens)).encode()).digest()
            raw = [b - 127.5 for b in digest[: self.n_embd]]
            norm = math.sqrt(sum(x * x for x in raw))
            vectors.append([x / norm for x in raw])
        return vectors

    def submit(self, req: GenerationRequest, outcome: GenerationOutcome, sink: Sink) -> SequenceHandle:
        self.last_request = req
        seq = _FakeSequence()
        with self._lock:
            if self.running >= self.max_slots:
                raise RuntimeError(f"all {self.max_slots} slots of the fake engine are busy")
            self.running += 1
            self.peak = max(self.peak, self.running)
            self._count += 1
            slot = self._count
        thread = threading.Thread(
            target=self._run, args=(req, outcome, sink, seq, slot), name=f"rbee-fake:{slot}", daemon=True
        )
        thread.start()
        return seq

    def _run(self, req: GenerationRequest, outcome: GenerationOutcome, sink: Sink, seq: _FakeSequence, n: int) -> None:
        error: BaseException | None = None
        try:
            if req.messages is not None:
                outcome.tokens_in = self.count_chat_tokens(req.messages, req.tools)
            elif req.suffix is not None:
                outcome.tokens_in = len(self.infill_tokens(req.prompt, req.suffix, req.infill_files))
            else:
                outcome.tokens_in = self.count_tokens(req.prompt)
            outcome.slot = (n - 1) % self.max_slots
            sink.post([SlotStart(outcome.slot, 0, outcome.tokens_in)])
            self._script(req, outcome, sink, seq)
        except BaseException as exc:
            error = exc
            outcome.stop_reason = "error"
        finally:
            with self._lock:
                self.running -= 1
            sink.post([Finished(error)])

    def _script(self, req: GenerationRequest, outcome: GenerationOutcome, sink: Sink, seq: _FakeSequence) -> None:
        """Piece ``k`` of the script is token id ``k``; ``resume`` picks up after its ids."""
        outcome.stop_reason = "cancelled"
        stops = StopScanner(req.stop)
        start = len(req.resume)
        for piece in self.pieces[:start]:  # already sent elsewhere: only the scanner's state matters
            stops.feed(piece)
        outcome.tokens_out = outcome.tokens_resumed = start
        started = time.perf_counter()
        pending: list[int] = []
        lps: list[dict[str, Any]] = []
        for k, piece in enumerate(self.pieces[start:], start):
            if outcome.tokens_out >= req.max_tokens:
                outcome.stop_reason = "max_tokens"
                break
            if seq.cancelled.is_set():
                return
            if self.delay_s:
                seq.cancelled.wait(self.delay_s)
                if seq.cancelled.is_set():
                    return
            if self.fail_after is not None and outcome.tokens_out >= self.fail_after:
                raise RuntimeError(f"scripted failure after {self.fail_after} tokens")
            if outcome.tokens_out == start:
                outcome.prefill_ms = (time.perf_counter() - started) * 1000.0
            outcome.tokens_out += 1
            with self._lock:
                self.generated += 1
            pending.append(k)
            if req.logprobs is not None:
                lps.append(self._logprob(k, req.logprobs))
            text, hit = stops.feed(piece)
            if text:
                sink.post([Piece(text, tuple(pending), tuple(lps) if req.logprobs is not None else None)])
                pending, lps = [], []
            if hit:
                outcome.stop_reason = "stop"
                outcome.stop_sequence = stops.matched
                return
        else:
            outcome.stop_reason = "eos"
        tail = stops.flush()
        if tail:
            sink.post([Piece(tail, tuple(pending), tuple(lps) if req.logprobs is not None else None)])

    def _logprob(self, k: int, top: int) -> dict[str, Any]:
        """Scripted log-probabilities: piece ``k`` at -0.5, its alternatives lower, in order."""

        def entry(i: int, logprob: float) -> dict[str, Any]:
            text = self.pieces[i % len(self.pieces)]
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        chosen = entry(k, -0.5)
        chosen["top_logprobs"] = [entry(k, -0.5)] + [entry(k + j, -0.5 - j) for j in range(1, top)] if top else []
        return chosen

"""Embeddings: mean-pooled, L2-normalised hidden states from a context of their own.

An :class:`Embedder` shares the engine's ``llama_model`` (its weights) but
never the generation context: it creates its own ``llama_context`` (with
``embeddings`` on) the first time it is asked, and every use of it is guarded
by a lock, so it can be called from any thread (the worker calls it from a
thread of its own, never the event loop).

The vector is what llama.cpp's server answers with ``--embeddings --pooling
mean``: the mean over every token of the input (BOS included) of the model's
last hidden state (after the output norm), divided by its Euclidean norm.
llama.cpp computes the logits of every row it outputs, in embeddings mode too
(for a 262k-token vocabulary that is 1 MiB per token), so the input is decoded
in windows of :data:`WINDOW` tokens with llama.cpp's pooling off, and the mean
is taken here; memory stays bounded whatever the input's length.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ["WINDOW", "Embedder", "normalize"]

#: Tokens decoded per ``llama_decode`` (each row's logits are computed and kept for the call).
WINDOW = 128


def normalize(vector: Sequence[float]) -> list[float]:
    """``vector`` divided by its Euclidean norm (a zero vector stays zero)."""
    norm = math.sqrt(math.fsum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else [0.0 for _ in vector]


class Embedder:
    """A lazily created embeddings context on ``model``, for inputs of up to ``n_ctx`` tokens."""

    def __init__(self, model: Any, *, n_ctx: int, n_threads: int | None = None, window: int = WINDOW) -> None:
        import llama_cpp

        self.model = model
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.window = max(1, min(window, n_ctx))
        self.n_embd = int(llama_cpp.llama_model_n_embd(model))
        self._ctx: Any = None
        self._batch: Any = None
        self._lock = threading.Lock()
        self._closed = False

    def _context(self) -> Any:
        import llama_cpp

        if self._ctx is None:
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = self.n_ctx
            params.n_batch = self.window
            params.n_ubatch = self.window
            params.n_seq_max = 1
            params.embeddings = True
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
            params.no_perf = True
            if self.n_threads:
                params.n_threads = self.n_threads
                params.n_threads_batch = self.n_threads
            ctx = llama_cpp.llama_init_from_model(self.model, params)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make an embeddings context of {self.n_ctx} tokens")
            self._ctx = ctx
            self._batch = llama_cpp.llama_batch_init(self.window, 0, 1)
        return self._ctx

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """One unit vector per input (token ids, each input at most ``n_ctx`` tokens, none empty)."""
        for i, tokens in enumerate(inputs):
            if not tokens:
                raise ValueError(f"input[{i}]: it has no tokens")
            if len(tokens) > self.n_ctx:
                raise ValueError(f"input[{i}]: {len(tokens)} tokens; the embedding context holds {self.n_ctx}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the model is closed")
            ctx = self._context()
            return [self._one(ctx, tokens) for tokens in inputs]

    def _one(self, ctx: Any, tokens: Sequence[int]) -> list[float]:
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        import numpy as np

        batch, n_embd = self._batch, self.n_embd
        sums = np.zeros(n_embd, dtype=np.float64)
        for start in range(0, len(tokens), self.window):
            part = tokens[start : start + self.window]
            for i, token in enumerate(part):
                batch.token[i] = int(token)
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = len(part)
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}) while embedding")
            for i in range(len(part)):
                row = llama_cpp.llama_get_embeddings_ith(ctx, i)
                if not row:
                    raise RuntimeError("llama.cpp gave no embedding for a token")
                sums += np.ctypeslib.as_array(row, shape=(n_embd,))
        return normalize((sums / len(tokens)).tolist())

    def close(self) -> None:
        import llama_cpp

        with self._lock:
            self._closed = True
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
                self._batch = None
            if self._ctx is not None:
                llama_cpp.llama_free(self._ctx)
                self._ctx = None

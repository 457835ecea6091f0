"""Continuous batching on llama.cpp's batch API: one thread, one ``llama_context``, many sequences.

:class:`BatchLoop` owns a ``llama_context`` with one KV stream per slot
(``n_seq_max = slots``, not unified, so a slot's attention never sees another
slot's cells) and runs the step loop on a thread of its own. Each step:

1. takes in new sequences (each into the free slot whose cached tokens share
   the longest prefix with its prompt; only the rest of the prompt is
   evaluated) and drops cancelled ones, freeing their slot. A prompt that
   shares a longer prefix with a *running* sequence (``n`` choices of one
   request, or many chats with one system prompt) gets that slot's KV copied
   into a free one (``llama_memory_seq_cp``, a memory copy of the stream)
   instead of evaluating it again; if the running one is still evaluating its
   prompt, the newcomer waits for it rather than evaluate the same tokens
   beside it;
2. builds one ``llama_batch``: the last sampled token of every generating
   sequence, then prompt tokens of starting sequences up to ``chunk`` tokens
   in all (chunked prefill: a 2 000-token prompt joins over four steps and
   never holds the others back for more than one chunk);
3. decodes it, samples one token for each sequence that asked for logits
   with the sequence's own native sampler chain (``llama_sampler_sample``:
   logit bias, penalties, then greedy or top-k/top-p/min-p/temp; no logits
   row is copied into Python, except for the sequences that asked for
   log-probabilities: their row is read once, after sampling). A grammar is
   applied lazily, as llama.cpp's own server does: the token the chain picked
   is tested against it alone, and only a token the grammar refuses makes the
   sequence sample again with the grammar first over the whole vocabulary
   (applying a JSON grammar to 262 144 candidates every step made structured
   output 3x slower than llama-server's). Then it renders the token with
   ``llama_token_to_piece`` (control tokens and the model's media markers
   never become text), cuts stop strings and posts the step's pieces to each
   sequence's sink in one call.

Everything llama.cpp is touched from this thread only; :meth:`BatchLoop.submit`
and the handles' ``cancel`` only put things in the inbox.
"""

from __future__ import annotations

import codecs
import ctypes
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from rbee.worker.engine import Finished, GenerationOutcome, GenerationRequest, Piece, Sink, SlotStart, StopScanner

__all__ = ["BatchLoop", "Step"]

#: User-defined tokens that mark media in multimodal vocabularies (``<start_of_image>``,
#: ``[multimodal]``); they are not text, though the GGUF types them like ``<table>``.
_MARKER = re.compile(rb"<[a-z]+(?:_[a-z]+)+>|\[[a-z]+\]")
#: How long, after a step that produced some sequence's first token, the loop steps aside
#: so that the token's trip through the event loops is not stuck behind llama.cpp's threads.
FIRST_PIECE_PAUSE_S = 0.0015


#: From idle, the first step waits until no request arrived for this long...
GATHER_QUIET_S = 0.003
#: ...but never longer than this.
GATHER_MAX_S = 0.012
#: Presence, frequency and repetition penalties look at this many of the last tokens.
PENALTY_LAST_N = 64
#: A running sequence's prompt KV is copied into a new sequence's slot when they share
#: at least this many more tokens than any free slot's cache does: copying a slot's stream
#: costs about what evaluating a few dozen tokens does.
SHARE_MIN_TOKENS = 32


@dataclass(frozen=True, slots=True)
class Step:
    """One decode, for the tests and the bench: who was in it and how long it took."""

    decoding: tuple[int, ...]  # slots that decoded one token
    prefill: tuple[tuple[int, int], ...]  # (slot, prompt tokens) evaluated in this step
    ms: float


@dataclass(eq=False)
class _Seq:
    req: GenerationRequest
    prompt: list[int]
    stops: list[str]
    outcome: GenerationOutcome
    sink: Sink
    criteria: Any
    strip_space: bool
    submitted: float = field(default_factory=time.perf_counter)
    slot: _Slot | None = None
    #: What goes into the KV before the first sample: the prompt, then the tokens resumed.
    feed: list[int] = field(default_factory=list)
    fed: int = 0  # tokens of ``feed`` in the KV
    last: int = -1  # the sampled token to feed next (-1: still in the prompt)
    generated: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # generated since the last piece was posted
    pending_lp: list[dict[str, Any]] = field(default_factory=list)  # their log-probabilities, if asked
    sampler: Any = None
    #: The grammar the output follows (a sampler of its own, applied lazily), or None.
    grammar: Any = None
    cancelled: bool = False
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="ignore"))
    scanner: StopScanner | None = None

    def cancel(self) -> None:
        self.cancelled = True  # read by the loop between steps; a bool store is atomic


@dataclass(eq=False)
class _Slot:
    index: int
    #: The tokens whose KV is in this slot's stream, in order (positions 0..len-1).
    cached: list[int] = field(default_factory=list)
    seq: _Seq | None = None
    used: int = 0  # when it last took a sequence (a counter)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class BatchLoop:
    def __init__(
        self,
        model: Any,
        *,
        slots: int,
        n_ctx_slot: int,
        n_threads: int | None,
        chunk: int = 512,
        name: str = "rbee-engine",
        flash_attn: bool | None = None,
    ) -> None:
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = slots * n_ctx_slot
        params.n_batch = chunk
        params.n_ubatch = chunk
        params.n_seq_max = slots
        params.kv_unified = False
        # A slot's prefix can be cut anywhere only if the sliding-window layers keep every cell.
        params.swa_full = True
        params.no_perf = True
        if flash_attn is not None:
            params.flash_attn_type = (
                llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        if n_threads:
            params.n_threads = n_threads
            params.n_threads_batch = n_threads
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {slots} x {n_ctx_slot} tokens")
        self.ctx = ctx
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.chunk = chunk
        self.n_ctx_slot = int(llama_cpp.llama_n_ctx_seq(ctx))
        self.batch = llama_cpp.llama_batch_init(chunk, 0, 1)
        self.slots = [_Slot(i) for i in range(slots)]
        # Copying a stream's KV into another and cutting it needs positional (attention) memory.
        self.can_share = slots > 1 and not (
            llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        )
        #: Prompts that started from another slot's KV (for the tests and the bench).
        self.shared = 0
        self.eog = llama_cpp.llama_vocab_is_eog
        self._piece_buf = ctypes.create_string_buffer(256)
        # Candidates for the samplers applied from here (grammar sequences): the whole
        # vocabulary, and one token to test against a grammar.
        self._cands = (llama_cpp.llama_token_data * self.n_vocab)()
        self._cands_np = np.ctypeslib.as_array(self._cands)
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self._cur = llama_cpp.llama_token_data_array(self._cands, self.n_vocab, -1, False)
        self._one = (llama_cpp.llama_token_data * 1)()
        self._cur_one = llama_cpp.llama_token_data_array(self._one, 1, -1, False)
        self._markers: dict[int, bool] = {}
        #: The last steps (newest last), for tests and the bench.
        self.trace: deque[Step] = deque(maxlen=4096)
        self.steps = 0
        self._uses = 0
        self._inbox: deque[_Seq] = deque()
        self._waiting: deque[_Seq] = deque()  # taken in, no slot free yet
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- the other threads' side -----------------------------------------------

    def submit(
        self,
        req: GenerationRequest,
        prompt: list[int],
        stops: list[str],
        outcome: GenerationOutcome,
        sink: Sink,
        *,
        stopping_criteria: Any = None,
        strip_space: bool = False,
    ) -> _Seq:
        if not prompt:
            raise ValueError("the prompt has no tokens")
        feed = [*prompt, *req.resume]
        if len(feed) >= self.n_ctx_slot:
            raise ValueError(f"the prompt is {len(feed)} tokens; a slot holds {self.n_ctx_slot}")
        outcome.tokens_in = len(prompt)
        outcome.stop_reason = "cancelled"
        seq = _Seq(req, prompt, stops, outcome, sink, stopping_criteria, strip_space, feed=feed)
        with self._wake:
            if self._closing:
                raise RuntimeError("the engine is closed")
            self._inbox.append(seq)
            self._wake.notify()
        return seq

    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.seq is not None)

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(10.0)
        if self._thread.is_alive():
            return  # never free the context under a step still running
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        self.ctx = None

    # -- the loop ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                idle = not self._active()
                while not self._closing and not self._inbox and not self._active():
                    self._wake.wait()
                if idle and not self._closing:
                    self._gather()
                if self._closing:
                    break
                while self._inbox:
                    self._waiting.append(self._inbox.popleft())
            try:
                self._step()
            except BaseException as exc:  # the model failed: every sequence in flight ends with it
                for slot in self.slots:
                    if slot.seq is not None:
                        self._finish(slot.seq, "error", [], error=exc)
                        slot.cached = []
                        llama_cpp.llama_memory_seq_rm(self.mem, slot.index, -1, -1)
        for seq in [*self._waiting, *self._inbox, *(s.seq for s in self.slots if s.seq is not None)]:
            self._finish(seq, "cancelled", [], error=RuntimeError("the engine closed"))

    def _gather(self) -> None:
        """Woken from idle: let requests that are arriving together start in the same first step.

        Clients that send several requests at once reach the worker a few ms apart
        (each crosses the queen first); evaluating the first prompt alone would make
        the others wait a whole prefill step for their first token.
        """
        deadline = time.perf_counter() + GATHER_MAX_S
        seen = len(self._inbox)
        while not self._closing:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._wake.wait(min(GATHER_QUIET_S, left))
            if len(self._inbox) == seen:
                return  # quiet for GATHER_QUIET_S: nobody else is coming
            seen = len(self._inbox)

    def _active(self) -> bool:
        return bool(self._waiting) or any(s.seq is not None for s in self.slots)

    def _step(self) -> None:
        seq: _Seq | None
        # Cancelled sequences leave first (also those still waiting and those mid-prompt).
        for gone in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(gone)
            self._finish(gone, "cancelled", [])
        for slot in self.slots:
            if slot.seq is not None and slot.seq.cancelled:
                self._finish(slot.seq, "cancelled", [])
        later: list[_Seq] = []
        while self._waiting and any(s.seq is None for s in self.slots):
            seq = self._waiting.popleft()
            if not self._place(seq):
                later.append(seq)  # waits for a running sequence's prompt to be in its KV
        self._waiting.extendleft(reversed(later))
        running = [s for s in self.slots if s.seq is not None]
        if not running:
            return

        batch = self.batch
        n = 0
        sample_rows: list[tuple[int, _Seq]] = []
        decoding: list[int] = []
        prefill: list[tuple[int, int]] = []
        for slot in running:
            seq = slot.seq
            assert seq is not None
            if seq.last >= 0:
                self._add(n, seq.last, len(slot.cached), slot.index, True)
                slot.cached.append(seq.last)
                sample_rows.append((n, seq))
                decoding.append(slot.index)
                n += 1
        budget = self.chunk - n
        for slot in running:
            seq = slot.seq
            assert seq is not None
            if seq.last >= 0 or budget <= 0:
                continue
            take = min(budget, len(seq.feed) - seq.fed)
            for i in range(take):
                token = seq.feed[seq.fed + i]
                self._add(n, token, len(slot.cached), slot.index, False)
                slot.cached.append(token)
                n += 1
            seq.fed += take
            budget -= take
            prefill.append((slot.index, take))
            if seq.fed == len(seq.feed):
                batch.logits[n - 1] = 1
                sample_rows.append((n - 1, seq))
        batch.n_tokens = n
        started = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, batch)
        self.steps += 1
        self.trace.append(Step(tuple(decoding), tuple(prefill), (time.perf_counter() - started) * 1000.0))
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} on a batch of {n} tokens")

        firsts = False
        for row, seq in sample_rows:
            token = self._sample(seq, row)
            if seq.last < 0:  # the first token after the prompt
                seq.outcome.prefill_ms = (time.perf_counter() - seq.submitted) * 1000.0
                firsts = True
            top = seq.req.logprobs
            self._advance(seq, token, None if top is None else self._logprobs(row, token, top))
        if firsts:
            time.sleep(FIRST_PIECE_PAUSE_S)

    def _sample(self, seq: _Seq, row: int) -> int:
        """The next token of ``seq`` from logits row ``row``; its samplers have accepted it."""
        if seq.grammar is None:
            return int(llama_cpp.llama_sampler_sample(seq.sampler, self.ctx, row))
        if not seq.req.penalized:
            # No sampler of the chain keeps state a refused token would spoil: sample in C.
            token = int(llama_cpp.llama_sampler_sample(seq.sampler, self.ctx, row))
            if not self._allows(seq.grammar, token):
                token = self._apply(seq, row, grammar_first=True)
        else:
            # The penalties remember what they accept: pick first, accept the final token only.
            token = self._apply(seq, row, grammar_first=False)
            if not self._allows(seq.grammar, token):
                token = self._apply(seq, row, grammar_first=True)
            llama_cpp.llama_sampler_accept(seq.sampler, token)
        llama_cpp.llama_sampler_accept(seq.grammar, token)
        return token

    def _apply(self, seq: _Seq, row: int, *, grammar_first: bool) -> int:
        """Apply the chain (after the grammar, if asked) to the whole of logits row ``row``."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, row)
        cands = self._cands_np
        cands["id"] = self._ids
        cands["logit"] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        cands["p"] = 0.0
        cur = self._cur
        cur.data = self._cands
        cur.size = self.n_vocab
        cur.selected = -1
        cur.sorted = False
        ref = ctypes.byref(cur)
        if grammar_first:
            llama_cpp.llama_sampler_apply(seq.grammar, ref)
        llama_cpp.llama_sampler_apply(seq.sampler, ref)
        if not 0 <= cur.selected < cur.size:
            raise RuntimeError("the sampler chain selected no token")
        return int(cur.data[cur.selected].id)

    def _allows(self, grammar: Any, token: int) -> bool:
        """Whether ``grammar`` lets ``token`` come next (the end-of-generation token too)."""
        one = self._one
        one[0].id = token  # type: ignore[assignment]
        one[0].logit = 1.0
        one[0].p = 0.0
        cur = self._cur_one
        cur.data = one
        cur.size = 1
        cur.selected = -1
        cur.sorted = False
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(cur))
        return bool(np.isfinite(one[0].logit))

    def _add(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b = self.batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits

    def _place(self, seq: _Seq) -> bool:
        """Put ``seq`` into the free slot whose cache shares the longest prefix with its prompt,
        or start it from a running slot's KV; False: it waits for that slot's prompt."""
        free = [s for s in self.slots if s.seq is None]
        shared = {s.index: _common_prefix(s.cached, seq.feed) for s in free}
        best = max(free, key=lambda s: shared[s.index])
        if shared[best.index] <= 1:
            # Nothing worth keeping in common (a BOS at most): take the slot used least recently,
            # so that the other slots' caches wait for their own next turn.
            best = min(free, key=lambda s: s.used)
        # At least the last prompt token is evaluated: its logits give the first token.
        reuse = min(shared[best.index], len(seq.feed) - 1)
        donor = self._donor(seq, reuse)
        if donor is not None:
            donor_slot, share = donor
            if _common_prefix(donor_slot.cached, seq.feed) < share:
                return False  # its prompt is still being evaluated: wait for it
            best = min(free, key=lambda s: s.used)  # the whole stream is replaced
            llama_cpp.llama_memory_seq_cp(self.mem, donor_slot.index, best.index, -1, -1)
            best.cached = donor_slot.cached[:]
            reuse = share
            self.shared += 1
        self._uses += 1
        best.used = self._uses
        try:
            grammar = self._grammar(seq.req)
        except ValueError as exc:  # a grammar llama.cpp refused (admission checks it first)
            self._finish(seq, "error", [], error=exc)
            return True
        sampler = self._sampler(seq.req)
        if not llama_cpp.llama_memory_seq_rm(self.mem, best.index, reuse, -1):
            llama_cpp.llama_memory_seq_rm(self.mem, best.index, -1, -1)
            reuse = 0
        del best.cached[reuse:]
        best.seq = seq
        seq.slot = best
        seq.fed = reuse
        seq.sampler = sampler
        seq.grammar = grammar
        seq.scanner = StopScanner(seq.stops)
        self._replay(seq)
        seq.outcome.tokens_reused = reuse
        seq.outcome.slot = best.index
        seq.sink.post([SlotStart(best.index, reuse, len(seq.prompt))])
        return True

    def _donor(self, seq: _Seq, reuse: int) -> tuple[_Slot, int] | None:
        """The running slot whose prompt shares the most with ``seq``'s, and how many tokens
        ``seq`` would take from it; None unless that beats ``reuse`` by SHARE_MIN_TOKENS."""
        if not self.can_share:
            return None
        best: tuple[_Slot, int] | None = None
        for slot in self.slots:
            if slot.seq is None:
                continue
            share = min(_common_prefix(slot.seq.feed, seq.feed), len(seq.feed) - 1)
            if share >= reuse + SHARE_MIN_TOKENS and (best is None or share > best[1]):
                best = (slot, share)
        return best

    def _grammar(self, req: GenerationRequest) -> Any:
        """The sequence's grammar sampler, or None; ``ValueError`` if llama.cpp cannot parse it."""
        if req.grammar is None:
            return None
        grammar = llama_cpp.llama_sampler_init_grammar(self.vocab, req.grammar.encode(), b"root")
        if not grammar:
            raise ValueError("llama.cpp could not parse the grammar")
        return grammar

    def _sampler(self, req: GenerationRequest) -> Any:
        """The sequence's chain: logit bias and penalties first, so that what samples after
        them (greedy, or top-k/top-p/min-p/temp/dist) only sees what they allow."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        if req.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(req.logit_bias))()
            for i, (token, bias) in enumerate(req.logit_bias.items()):
                biases[i].token = token  # type: ignore[assignment]
                biases[i].bias = bias
            add(chain, llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(req.logit_bias), biases))
        if req.penalized:
            penalties = llama_cpp.llama_sampler_init_penalties(
                self.n_vocab, PENALTY_LAST_N, req.repeat_penalty, req.frequency_penalty, req.presence_penalty
            )
            add(chain, penalties)
        if req.temperature <= 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if req.top_k > 0:
            add(chain, llama_cpp.llama_sampler_init_top_k(req.top_k))
        if req.top_p < 1.0:
            add(chain, llama_cpp.llama_sampler_init_top_p(req.top_p, 1))
        if req.min_p > 0.0:
            add(chain, llama_cpp.llama_sampler_init_min_p(req.min_p, 1))
        add(chain, llama_cpp.llama_sampler_init_temp(req.temperature))
        seed = req.seed if req.seed is not None else random.randint(0, 2**32 - 2)
        add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _logprobs(self, row: int, token: int, top: int) -> dict[str, Any]:
        """The sampled token's log-probability and the ``top`` likeliest tokens' (a log-softmax
        over the model's logits row, before the sampler chain), in OpenAI's shape."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, row)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        peak = float(logits.max())
        norm = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
        entry = self._lp_entry(token, float(logits[token]) - norm)
        alternatives: list[dict[str, Any]] = []
        if top > 0:
            best = np.argpartition(logits, -top)[-top:]
            best = best[np.argsort(-logits[best], kind="stable")]
            alternatives = [self._lp_entry(int(t), float(logits[t]) - norm) for t in best]
        entry["top_logprobs"] = alternatives
        return entry

    def _lp_entry(self, token: int, logprob: float) -> dict[str, Any]:
        raw = self._piece(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": min(0.0, logprob), "bytes": list(raw)}

    def _item(self, seq: _Seq, text: str) -> Piece:
        """A piece of ``seq``'s text, with the tokens (and log-probabilities) since the last one."""
        lp = None
        if seq.req.logprobs is not None:
            lp = tuple(seq.pending_lp)
            seq.pending_lp.clear()
        piece = Piece(text, tuple(seq.pending), lp)
        seq.pending.clear()
        return piece

    def _piece(self, token: int) -> bytes:
        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        raw = buf.raw[:n]
        marker = self._markers.get(token)
        if marker is None:
            attr = llama_cpp.llama_vocab_get_attr(self.vocab, token)
            marker = bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED) and _MARKER.fullmatch(raw) is not None
            self._markers[token] = marker
        return b"" if marker else raw

    def _replay(self, seq: _Seq) -> None:
        """Bring a resumed sequence's text state to where it was: the text of its resumed
        tokens was sent already, but what the decoder and the stop scanner hold back is not."""
        assert seq.scanner is not None
        for token in seq.req.resume:
            raw = self._piece(token)
            if seq.strip_space and not seq.generated and raw.startswith(b" "):
                raw = raw[1:]
            seq.generated.append(token)
            seq.scanner.feed(seq.decoder.decode(raw))
            llama_cpp.llama_sampler_accept(seq.sampler, token)  # the penalties and grammar go on from here
            if seq.grammar is not None:
                llama_cpp.llama_sampler_accept(seq.grammar, token)
        seq.outcome.tokens_out = seq.outcome.tokens_resumed = len(seq.generated)

    def _advance(self, seq: _Seq, token: int, lp: dict[str, Any] | None = None) -> None:
        """Take the token sampled for ``seq``: end it, or render it and feed it next step."""
        out = seq.outcome
        if self.eog(self.vocab, token):
            self._finish(seq, "eos", [])
            return
        if seq.criteria is not None:
            ids = np.array([*seq.prompt, *seq.generated, token], dtype=np.intc)
            if seq.criteria(ids, np.empty(0, dtype=np.single)):
                self._finish(seq, "stop", [], flush=True)
                return
        seq.generated.append(token)
        seq.pending.append(token)
        if lp is not None:
            seq.pending_lp.append(lp)
        out.tokens_out += 1
        raw = self._piece(token)
        if seq.strip_space and out.tokens_out == 1 and raw.startswith(b" "):
            raw = raw[1:]
        assert seq.scanner is not None
        text, hit = seq.scanner.feed(seq.decoder.decode(raw))
        items: list[Any] = []
        if text:
            items.append(self._item(seq, text))
        if hit:
            self._finish(seq, "stop", items)
        elif out.tokens_out >= seq.req.max_tokens:
            self._finish(seq, "max_tokens", items)
        elif seq.slot is not None and len(seq.slot.cached) + 1 > self.n_ctx_slot:
            self._finish(seq, "max_tokens", items)  # the slot's context is full
        else:
            seq.last = token
            if items:
                seq.sink.post(items)

    def _finish(
        self, seq: _Seq, reason: str, items: list[Any], error: BaseException | None = None, flush: bool = False
    ) -> None:
        out = seq.outcome
        out.stop_reason = "error" if error is not None and reason != "cancelled" else reason
        if reason == "stop" and seq.scanner is not None:
            out.stop_sequence = seq.scanner.matched
        if error is None and (flush or reason in ("eos", "max_tokens")) and seq.scanner is not None:
            text, hit = seq.scanner.feed(seq.decoder.decode(b"", final=True))
            tail = text if hit else text + seq.scanner.flush()
            if hit:
                out.stop_reason = "stop"
                out.stop_sequence = seq.scanner.matched
            if tail:
                items.append(self._item(seq, tail))
        if seq.sampler is not None:
            llama_cpp.llama_sampler_free(seq.sampler)
            seq.sampler = None
        if seq.grammar is not None:
            llama_cpp.llama_sampler_free(seq.grammar)
            seq.grammar = None
        if seq.slot is not None:
            seq.slot.seq = None
            seq.slot = None
        items.append(Finished(error if reason != "cancelled" or error is not None else None))
        seq.sink.post(items)

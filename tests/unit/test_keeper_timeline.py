"""``rbee jobs show`` draws the job's timeline as a table: each step, when it began, the time spent in it."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from click.testing import CliRunner

from rbee.keeper.cli import cli
from rbee.keeper.tables import print_job

JOB: dict[str, Any] = {
    "job_id": "job-1234",
    "operation": "infer",
    "status": "completed",
    "tokens_out": 64,
    "timeline": [
        {"step": "created", "at_ms": 0.0, "took_ms": 0.4},
        {"step": "started", "at_ms": 0.4, "took_ms": 0.5},
        {"step": "worker chosen", "at_ms": 0.9, "took_ms": 0.1},
        {"step": "dispatched", "at_ms": 1.0, "took_ms": 41.0},
        {"step": "first token", "at_ms": 42.0, "took_ms": 1458.0},
        {"step": "end (completed)", "at_ms": 1500.0, "took_ms": None},
    ],
}


def rows_of(text: str, title: str) -> list[list[str]]:
    """The body rows of the table under ``title`` in rich's box drawing, cells stripped."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("└"):
            break
        if line.startswith("│"):
            rows.append([cell.strip() for cell in line.strip("│").split("│")])
    return rows


def test_the_timeline_is_a_table_with_the_time_spent_in_each_step() -> None:
    out = io.StringIO()
    print_job("job-1234", JOB, out=out, colour=False)
    rows = rows_of(out.getvalue(), "timeline")
    assert [r[0] for r in rows] == [s["step"] for s in JOB["timeline"]]
    assert rows[3] == ["dispatched", "1.0 ms", "41.0 ms", "3%"]
    assert rows[4] == ["first token", "42.0 ms", "1.46 s", "97%"]
    assert rows[-1] == ["end (completed)", "1.50 s", "-", "-"]


def test_the_fields_are_shown_without_the_timeline_list() -> None:
    out = io.StringIO()
    print_job("job-1234", JOB, out=out, colour=False)
    fields = rows_of(out.getvalue(), "job-1234")
    assert ["state", "completed"] in fields
    assert not any(r[0] == "timeline" for r in fields)


def test_the_prompt_and_the_output_follow_the_fields_and_units_match_their_labels() -> None:
    job = {
        **JOB,
        "payload": {"operation": "infer", "model": "tiny", "prompt": "Once upon a time", "max_tokens": 64},
        "text": " there was a queen.\nThe end.",
        "ttft_ms": 122.4,
        "duration_ms": 1500.0,
        "created_at": 1_700_000_000.0,
    }
    out = io.StringIO()
    print_job("job-1234", job, out=out, colour=False)
    text = out.getvalue()
    fields = rows_of(text, "job-1234")
    assert ["TTFT", "122 ms"] in fields and ["duration", "1500 ms"] in fields
    assert ["model", "tiny"] in fields and ["settings", "max_tokens=64"] in fields
    assert not any(r[0] in ("payload", "text", "ttft ms") for r in fields)
    lines = text.splitlines()
    assert lines[lines.index("prompt") + 1] == "Once upon a time"
    assert lines[lines.index("output") + 1 : lines.index("output") + 3] == [" there was a queen.", "The end."]


def test_a_job_without_a_timeline_shows_only_its_fields() -> None:
    out = io.StringIO()
    print_job("job-1234", {"job_id": "job-1234", "status": "running"}, out=out, colour=False)
    assert "timeline" not in out.getvalue()
    assert "running" in out.getvalue()


class _Queen:
    """Answers ``GET /v1/jobs/job-1234`` with :data:`JOB`, and ``/health``."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = self.path in ("/v1/jobs/job-1234", "/health")
                body = json.dumps(JOB if self.path != "/health" else {"status": "ok"}).encode()
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="timeline-queen", daemon=True)


@pytest.fixture
def queen() -> Iterator[_Queen]:
    q = _Queen()
    q.thread.start()
    try:
        yield q
    finally:
        q.server.shutdown()
        q.server.server_close()


def test_rbee_jobs_show_prints_the_timeline(queen: _Queen) -> None:
    result = CliRunner().invoke(
        cli, ["--queen-url", queen.url, "jobs", "show", "job-1234"], env={"RBEE_NO_AUTOSTART": "1", "NO_COLOR": "1"}
    )
    assert result.exit_code == 0, result.output
    steps = [r[0] for r in rows_of(result.output, "timeline")]
    assert steps == [s["step"] for s in JOB["timeline"]]


def test_rbee_json_jobs_show_keeps_the_timeline_as_data(queen: _Queen) -> None:
    result = CliRunner().invoke(
        cli, ["--queen-url", queen.url, "--json", "jobs", "show", "job-1234"], env={"RBEE_NO_AUTOSTART": "1"}
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["timeline"] == JOB["timeline"]


def test_a_live_job_of_an_older_queen_shows_its_tokens_and_duration() -> None:
    from rbee.keeper.tables import job_row

    older = {"job_id": "job-5678", "operation": "infer", "status": "running", "created_at": 10.0, "tokens": 5}
    assert job_row(older)["tokens"] == 5
    ended = {**older, "status": "completed", "finished_at": 12.0}
    assert job_row(ended)["duration"] == "2000 ms"
    out = io.StringIO()
    print_job("job-5678", ended, out=out, colour=False)
    fields = dict(row[:2] for row in rows_of(out.getvalue(), "job-5678"))
    assert fields.get("tokens out") == "5"

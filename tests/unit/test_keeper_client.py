"""The keeper's client and commands against a scripted queen (a stdlib HTTP server in a thread).

The scripted queen answers each request from a route table, so these tests
pin what the keeper sends and how it reads what comes back: only the given
fields, streams that end, break, resume with ``Last-Event-ID``, refusals,
Ctrl-C, and the exit code the ``end`` event decides.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from rbee.keeper import render
from rbee.keeper.cli import cli
from rbee.keeper.client import QueenClient, _frames
from rbee.keeper.errors import QueenUnreachable, RequestRefused, StreamBroken

pytestmark = pytest.mark.timeout(30)

JOB = "job-00000000-0000-4000-8000-000000000001"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


# A route answers (status, body): bytes for a plain answer, a list of bytes
# (and float pauses) for a stream written piece by piece, then closed.
Route = Callable[[Seen], tuple[int, Any]]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the connection closes after each answer, which ends a stream

    def _handle(self) -> None:
        fake: ScriptedQueen = self.server.fake  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        seen = Seen(self.command, self.path, dict(self.headers), self.rfile.read(length) if length else b"")
        fake.seen.append(seen)
        route = fake.routes.get((self.command, self.path.split("?")[0]))
        status, body = route(seen) if route else (404, {"error": {"kind": "not_found", "message": "no route"}})
        try:
            if isinstance(body, list):
                self.send_response(status)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for piece in body:
                    if isinstance(piece, float):
                        time.sleep(piece)
                        continue
                    self.wfile.write(piece)
                    self.wfile.flush()
                return
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the keeper hung up, as it may

    do_GET = do_POST = do_DELETE = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a stream left paused after the keeper hung up ends with the test


class ScriptedQueen:
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.seen: list[Seen] = []
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.fake = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), name="scripted-queen", daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def route(self, method: str, path: str, answer: Route) -> None:
        self.routes[(method, path)] = answer

    def requests(self, method: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def frame(event_id: int, kind: str, data: Any) -> bytes:
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


def narr(event_id: int, human: str) -> bytes:
    return frame(event_id, "narration", {"actor": "queen", "action": "step", "human": human, "level": "info", "ts": 1})


def end_frame(event_id: int, status: str = "completed", error: dict[str, str] | None = None, **fields: Any) -> bytes:
    return frame(event_id, "end", {"job_id": JOB, "status": status, "error": error, "duration_ms": 5.0, **fields})


def accept(seen: Seen) -> tuple[int, Any]:
    return 201, {"job_id": JOB, "sse_url": f"/v1/jobs/{JOB}/stream"}


@pytest.fixture
def queen() -> Iterator[ScriptedQueen]:
    fake = ScriptedQueen()
    fake.route("POST", "/v1/jobs", accept)
    yield fake
    fake.close()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str | None]:
    return {
        "RBEE_NO_AUTOSTART": "1",
        "RBEE_HOME": str(tmp_path / "home"),
        "RBEE_CONFIG": str(tmp_path / "config.toml"),
        "RBEE_QUEEN_URL": None,
        "RBEE_TOKEN": None,
        "NO_COLOR": None,
    }


def invoke(queen: ScriptedQueen, env: dict[str, str | None], *args: str, stdin: str | None = None) -> Any:
    return CliRunner().invoke(cli, ["--queen-url", queen.url, *args], env=env, input=stdin)


def stream(*pieces: Any) -> Route:
    return lambda seen: (200, list(pieces))


# -- the client ------------------------------------------------------------------


def test_frames_parse_ids_kinds_multiline_data_and_skip_pings() -> None:
    class Body:
        def __init__(self, data: bytes) -> None:
            self.chunks = [data[i : i + 7] for i in range(0, len(data), 7)]  # split mid-line on purpose

        def read1(self, n: int) -> bytes:
            return self.chunks.pop(0) if self.chunks else b""

    raw = b': ping\r\n\r\nid: 1\r\nevent: token\r\ndata: {"t": "a"}\r\n\r\nid: 2\ndata: x\ndata: y\n\n'
    assert list(_frames(Body(raw))) == [("1", "token", '{"t": "a"}'), ("2", "message", "x\ny")]  # type: ignore[arg-type]


def test_submit_returns_the_job_id_and_sends_the_token(queen: ScriptedQueen) -> None:
    client = QueenClient(queen.url, "s3cret-token-0123456789")
    assert client.submit({"operation": "status"}) == JOB
    seen = queen.requests("POST")[0]
    assert seen.json() == {"operation": "status"}
    assert seen.headers["Authorization"] == "Bearer s3cret-token-0123456789"


def test_a_422_names_the_field_and_means_exit_2(queen: ScriptedQueen) -> None:
    error = {"kind": "invalid_operation", "message": "temperature: must be <= 2", "field": "temperature"}
    queen.route("POST", "/v1/jobs", lambda seen: (422, {"error": error}))
    with pytest.raises(RequestRefused) as info:
        QueenClient(queen.url).submit({"operation": "infer", "prompt": "x", "temperature": 5})
    assert info.value.exit_code == 2
    assert info.value.field == "temperature"
    assert info.value.message == "temperature: must be <= 2"


def test_an_unreachable_queen_is_one_error_that_says_where_and_why() -> None:
    with pytest.raises(QueenUnreachable) as info:
        QueenClient("http://127.0.0.1:1", unreachable_hint="start it").submit({"operation": "status"})
    assert info.value.connect
    assert info.value.message == "cannot reach the queen at http://127.0.0.1:1: connection refused (start it)"
    assert info.value.exit_code == 1


def test_events_stop_at_the_end_event(queen: ScriptedQueen) -> None:
    queen.route("GET", f"/v1/jobs/{JOB}/stream", stream(narr(1, "a"), b": ping\n\n", end_frame(2), DONE))
    events = list(QueenClient(queen.url).events(JOB, cancel_on_disconnect=True))
    assert [(e.id, e.kind) for e in events] == [(1, "narration"), (2, "end")]
    assert queen.requests("GET")[0].path.endswith("?cancel_on_disconnect=true")


def test_a_stream_without_an_end_is_broken_never_success(queen: ScriptedQueen) -> None:
    queen.route("GET", f"/v1/jobs/{JOB}/stream", stream(narr(1, "a"), DONE))
    with pytest.raises(StreamBroken):
        list(QueenClient(queen.url).events(JOB))


def test_a_broken_stream_resumes_with_last_event_id(queen: ScriptedQueen) -> None:
    def answer(seen: Seen) -> tuple[int, Any]:
        if "Last-Event-ID" not in seen.headers:
            return 200, [narr(1, "a"), narr(2, "b")]  # then the connection drops
        assert seen.headers["Last-Event-ID"] == "2"
        return 200, [narr(2, "b"), narr(3, "c"), end_frame(4), DONE]  # the replay may overlap

    queen.route("GET", f"/v1/jobs/{JOB}/stream", answer)
    events = list(QueenClient(queen.url).events(JOB))
    assert [e.id for e in events] == [1, 2, 3, 4]


def test_a_stream_that_keeps_breaking_gives_up(queen: ScriptedQueen) -> None:
    queen.route("GET", f"/v1/jobs/{JOB}/stream", stream(narr(1, "a")))
    with pytest.raises(StreamBroken) as info:
        list(QueenClient(queen.url).events(JOB, reconnects=1))
    assert "closed the stream before the job's end" in info.value.message


def test_a_frame_that_is_not_json_breaks_the_stream_and_is_not_retried(queen: ScriptedQueen) -> None:
    garbled = b"id: 1\nevent: narration\ndata: <html>\n\n"
    queen.route("GET", f"/v1/jobs/{JOB}/stream", stream(garbled, end_frame(2), DONE))
    with pytest.raises(StreamBroken, match="event 1 \\(narration\\) does not carry JSON") as info:
        list(QueenClient(queen.url).events(JOB))
    assert info.value.exit_code == 1
    assert len(queen.requests("GET")) == 1


def test_a_lone_cr_line_end_and_a_nul_in_an_id_read_as_the_spec_says(queen: ScriptedQueen) -> None:
    body = b"id: 9\x00\nevent: token\ndata: {}\n\n" + narr(2, "a").replace(b"\n", b"\r") + end_frame(3) + DONE
    queen.route("GET", f"/v1/jobs/{JOB}/stream", stream(body))
    events = list(QueenClient(queen.url).events(JOB))
    # The NUL id is ignored: the token has no id, so it is counted after the last one seen.
    assert [(e.id, e.kind) for e in events] == [(1, "token"), (2, "narration"), (3, "end")]


def test_a_refusal_is_read_by_the_wire_error_decoder(queen: ScriptedQueen) -> None:
    client = QueenClient(queen.url)
    body = json.dumps({"error": {"kind": "queue_full", "message": ""}}).encode()
    refused = client.refused(429, body)
    assert (refused.status, refused.kind, refused.exit_code) == (429, "queue_full", 1)
    assert refused.message.startswith("the queen answered HTTP 429")
    unknown = client.refused(404, json.dumps({"error": {"kind": "brand_new", "message": "no such thing"}}).encode())
    assert (unknown.kind, unknown.exit_code, unknown.message) == ("brand_new", 2, "no such thing")


# -- commands through the scripted queen -------------------------------------------


def test_infer_sends_only_the_given_fields_and_prints_tokens(queen: ScriptedQueen, env: dict[str, Any]) -> None:
    tokens = [frame(i + 2, "token", {"t": t, "i": i}) for i, t in enumerate(["Hel", "lo"])]
    queen.route("GET", f"/v1/jobs/{JOB}/stream", stream(narr(1, "Scheduling"), *tokens, end_frame(4), DONE))
    result = invoke(queen, env, "infer", "--max-tokens", "8", "--stop", "a", "--stop", "b", "Say hi")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello"
    # Off a terminal: no narration and no status line, only the summary.
    assert result.stderr.splitlines() == ["2 tokens, total 0.01 s"]
    verbose = invoke(queen, env, "infer", "-v", "Say hi")
    assert verbose.stderr.splitlines() == ["[queen] Scheduling", "2 tokens, total 0.01 s"]
    sent = queen.requests("POST")[0].json()
    assert sent == {
        "operation": "infer",
        "model": "gemma3-270m",
        "max_tokens": 8,
        "stop": ["a", "b"],
        "prompt": "Say hi",
    }


def test_infer_reads_the_prompt_from_stdin_and_the_model_from_the_config(
    queen: ScriptedQueen, env: dict[str, Any], tmp_path: Path
) -> None:
    Path(env["RBEE_CONFIG"]).write_text('default_model = "tiny"\n[sampling]\ntemperature = 0.0\n')
    queen.route("GET", f"/v1/jobs/{JOB}/stream", stream(end_frame(1), DONE))
    result = invoke(queen, env, "-q", "infer", "-", stdin="from stdin\n")
    assert result.exit_code == 0, result.output
    sent = queen.requests("POST")[0].json()
    assert sent == {"operation": "infer", "model": "tiny", "temperature": 0.0, "prompt": "from stdin\n"}


def test_a_failed_job_exits_1_with_one_line(queen: ScriptedQueen, env: dict[str, Any]) -> None:
    error = {"kind": "worker_lost", "message": "worker w1 went away"}
    queen.route("GET", f"/v1/jobs/{JOB}/stream", stream(narr(1, "a"), end_frame(2, "failed", error), DONE))
    result = invoke(queen, env, "-q", "infer", "hi")
    assert result.exit_code == 1
    hint = "(try again; `rbee status` shows the workers left)"
    assert result.stderr == f"rbee: failed: worker w1 went away {hint}\n"


@pytest.mark.parametrize("status", ["cancelled", "timed_out"])
def test_cancelled_and_timed_out_jobs_exit_1(queen: ScriptedQueen, env: dict[str, Any], status: str) -> None:
    queen.route("GET", f"/v1/jobs/{JOB}/stream", stream(end_frame(1, status, {"kind": status, "message": "m"}), DONE))
    result = invoke(queen, env, "queen-check")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith(f"rbee: {status.replace('_', ' ')}: m")


def test_a_stream_that_closes_without_end_exits_1_with_one_line(queen: ScriptedQueen, env: dict[str, Any]) -> None:
    queen.route("GET", f"/v1/jobs/{JOB}/stream", stream(narr(1, "a"), DONE))
    result = invoke(queen, env, "-q", "status")
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("rbee: the stream of")


def test_a_refused_post_is_one_line_exit_1(queen: ScriptedQueen, env: dict[str, Any]) -> None:
    error = {"kind": "no_worker", "message": "no hive that has 'gemma3-270m' is online"}
    queen.route("POST", "/v1/jobs", lambda seen: (503, {"error": error}))
    result = invoke(queen, env, "infer", "hi")
    assert result.exit_code == 1
    hint = "(see `rbee status` for the hives and workers)"
    assert result.stderr == f"rbee: no hive that has 'gemma3-270m' is online {hint}\n"


def test_json_mode_prints_each_event_and_no_tables(queen: ScriptedQueen, env: dict[str, Any]) -> None:
    result_frame = frame(2, "result", {"hives": [], "workers": [], "queues": {}})
    queen.route("GET", f"/v1/jobs/{JOB}/stream", stream(narr(1, "a"), result_frame, end_frame(3), DONE))
    result = invoke(queen, env, "--json", "status")
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["event"] for line in lines] == ["narration", "result", "end"]
    assert result.stderr == ""


def test_ctrl_c_cancels_the_job_reads_to_its_end_and_exits_130(
    queen: ScriptedQueen, env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    cancelled = {"kind": "cancelled", "message": "cancelled: cancelled by request"}

    def answer(seen: Seen) -> tuple[int, Any]:
        if "Last-Event-ID" not in seen.headers:
            return 200, [frame(1, "token", {"t": "a", "i": 0}), 5.0]  # a long pause: the job is running
        return 200, [narr(2, "infer cancelled"), end_frame(3, "cancelled", cancelled), DONE]

    queen.route("GET", f"/v1/jobs/{JOB}/stream", answer)
    queen.route("DELETE", f"/v1/jobs/{JOB}", lambda seen: (202, {"job_id": JOB, "status": "running"}))
    real_token = render.Renderer.token

    def interrupted(self: render.Renderer, data: dict[str, Any]) -> None:
        real_token(self, data)
        raise KeyboardInterrupt  # as if Ctrl-C arrived right after the first token

    monkeypatch.setattr(render.Renderer, "token", interrupted)
    result = invoke(queen, env, "infer", "hi")
    assert result.exit_code == 130
    assert len(queen.requests("DELETE")) == 1
    resumed = queen.requests("GET")[-1]
    assert resumed.headers["Last-Event-ID"] == "1"
    assert result.stdout == "a"  # nothing of the job follows the Ctrl-C
    assert result.stderr == "rbee: cancelled\n"


def test_an_unreachable_queen_without_autostart_is_one_line_exit_1(env: dict[str, Any]) -> None:
    result = CliRunner().invoke(cli, ["status"], env={**env, "RBEE_QUEEN_URL": "http://127.0.0.1:1"})
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "rbee: cannot reach the queen at http://127.0.0.1:1: connection refused (start it with `rbee queen start`)"
    ]


def test_no_queen_is_started_at_an_explicit_other_url(env: dict[str, Any]) -> None:
    env = {**env, "RBEE_NO_AUTOSTART": None}
    result = CliRunner().invoke(cli, ["--queen-url", "http://127.0.0.1:1", "status"], env=env)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "rbee: cannot reach the queen at http://127.0.0.1:1: connection refused (check --queen-url, or start a "
        "queen there with `rbee --queen-url http://127.0.0.1:1 queen start`)"
    ]
    assert not (Path(env["RBEE_HOME"]) / "queen.pid").exists()


def test_a_remote_queen_is_never_started(env: dict[str, Any]) -> None:
    env = {**env, "RBEE_NO_AUTOSTART": None}
    # 192.0.2.0/24 is reserved for documentation: nothing answers there.
    result = CliRunner().invoke(cli, ["--queen-url", "http://192.0.2.1:7833", "jobs", "list"], env=env)
    assert result.exit_code == 1
    assert result.stderr.startswith("rbee: cannot reach the queen at http://192.0.2.1:7833:")
    assert "Started" not in result.stderr


def test_the_token_comes_from_the_environment(queen: ScriptedQueen, env: dict[str, Any]) -> None:
    queen.route("GET", "/v1/jobs", lambda seen: (200, {"jobs": []}))
    result = invoke(queen, {**env, "RBEE_TOKEN": "from-the-env-0123456789"}, "jobs", "list")
    assert result.exit_code == 0, result.output
    assert queen.seen[-1].headers["Authorization"] == "Bearer from-the-env-0123456789"


def test_jobs_list_shows_the_columns(queen: ScriptedQueen, env: dict[str, Any]) -> None:
    now = time.time()
    prompt = "Write a long story about a dragon\nwho learns to bake bread"
    jobs = [
        {"job_id": JOB, "operation": "infer", "status": "running", "created_at": now - 200, "tokens_out": 12,
         "payload": {"operation": "infer", "model": "tiny", "prompt": prompt}},
        {"job_id": "job-b1c2d3e4-0000-4000-8000-000000000002", "operation": "status", "status": "completed",
         "created_at": now - 7300, "duration_ms": 2.0, "tokens_out": None, "payload": {"operation": "status"}},
    ]  # fmt: skip
    queen.route("GET", "/v1/jobs", lambda seen: (200, {"jobs": jobs}))
    result = invoke(queen, env, "jobs", "list")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    rows = [line for line in result.stdout.splitlines() if "│" in line]
    assert [c.strip() for c in rows[0].split("│")[1:-1]] == [
        "00000000", "infer", "tiny", "Write a long story about a ...", "running", "3m ago", "12"
    ]  # fmt: skip
    assert [c.strip() for c in rows[1].split("│")[1:-1]] == ["b1c2d3e4", "status", "-", "-", "completed", "2h ago", "-"]
    header = next(line for line in result.stdout.splitlines() if "┃" in line)
    assert [c.strip() for c in header.split("┃")[1:-1]] == ["id", "operation", "model", "prompt", "state", "age",
                                                            "tokens"]  # fmt: skip


# -- detached jobs and flags after the command -------------------------------------


def test_infer_detach_prints_the_job_id_and_never_opens_the_stream(queen: ScriptedQueen, env: dict[str, Any]) -> None:
    result = invoke(queen, env, "infer", "--detach", "a long story")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{JOB}\n"
    assert "rbee jobs logs --follow 00000000" in result.stderr
    assert [s.method for s in queen.seen] == ["POST"]  # no stream, so nothing can cancel it
    assert queen.requests("POST")[0].json()["prompt"] == "a long story"
    as_json = invoke(queen, env, "infer", "-d", "--json", "again")
    assert json.loads(as_json.stdout) == {"job_id": JOB, "detached": True}
    assert as_json.stderr == ""


def test_json_and_quiet_work_after_the_command_too(queen: ScriptedQueen, env: dict[str, Any]) -> None:
    queen.route("GET", f"/v1/jobs/{JOB}/stream", stream(narr(1, "a"), frame(2, "token", {"t": "x", "i": 0}),
                                                        end_frame(3), DONE))  # fmt: skip
    result = invoke(queen, env, "infer", "hi", "--json")
    assert [json.loads(line)["event"] for line in result.stdout.splitlines()] == ["narration", "token", "end"]
    quiet = invoke(queen, env, "infer", "hi", "-q")
    assert (quiet.stdout, quiet.stderr) == ("x", "")


def test_jobs_logs_replays_from_the_start_and_says_when_the_job_still_runs(
    queen: ScriptedQueen, env: dict[str, Any]
) -> None:
    queen.route("GET", f"/v1/jobs/{JOB}", lambda seen: (200, {"job_id": JOB, "status": "running", "events": 2}))
    queen.route("GET", f"/v1/jobs/{JOB}/stream", stream(narr(1, "a"), frame(2, "token", {"t": "x", "i": 0}), 5.0))
    result = invoke(queen, env, "jobs", "logs", JOB)
    assert result.exit_code == 0, result.output
    assert result.stdout == "[queen] a\nx"  # the narration is the output here
    assert result.stderr.splitlines() == [
        "00000000 is still running; watch it to its end with: rbee jobs logs --follow 00000000"
    ]
    stream_request = queen.requests("GET")[-1]
    assert "Last-Event-ID" not in stream_request.headers and "cancel_on_disconnect" not in stream_request.path


def test_stop_understands_newline_tab_and_backslash_escapes(queen: ScriptedQueen, env: dict[str, Any]) -> None:
    queen.route("GET", f"/v1/jobs/{JOB}/stream", stream(end_frame(1), DONE))
    result = invoke(queen, env, "-q", "infer", "--stop", "\\n\\n", "--stop", "a\\tb\\\\n", "--stop", "C:\\x", "hi")
    assert result.exit_code == 0, result.output
    assert queen.requests("POST")[0].json()["stop"] == ["\n\n", "a\tb\\n", "C:\\x"]


def test_token_and_queen_url_work_after_the_command(queen: ScriptedQueen, env: dict[str, Any]) -> None:
    queen.route("GET", "/v1/jobs", lambda seen: (200, {"jobs": []}))
    result = CliRunner().invoke(
        cli, ["jobs", "list", "--queen-url", queen.url, "--token", "after-the-command-0123"], env=env
    )
    assert result.exit_code == 0, result.output
    assert queen.seen[-1].headers["Authorization"] == "Bearer after-the-command-0123"


def test_a_refused_field_names_the_flag_or_the_config_entry_it_came_from(
    queen: ScriptedQueen, env: dict[str, Any]
) -> None:
    Path(env["RBEE_CONFIG"]).write_text("[sampling]\ntop_k = -1\n")
    problems = [
        {"field": "max_tokens", "reason": "Input should be greater than or equal to 1"},
        {"field": "top_k", "reason": "Input should be greater than or equal to 0"},
    ]
    error = {"kind": "invalid_request", "message": "max_tokens: ...", "field": "max_tokens", "problems": problems}
    queen.route("POST", "/v1/jobs", lambda seen: (422, {"error": error}))
    result = invoke(queen, env, "infer", "--max-tokens", "0", "hi")
    assert result.exit_code == 2
    assert result.stderr == (
        "rbee: --max-tokens must be at least 1; top_k (from [sampling] in the config file) must be at least 0\n"
    )


@pytest.mark.parametrize(("status", "kind", "code"), [(404, "job_not_found", 2), (400, "ambiguous_job_id", 2)])
def test_an_unknown_or_ambiguous_job_id_is_bad_input(
    queen: ScriptedQueen, env: dict[str, Any], status: int, kind: str, code: int
) -> None:
    queen.route("GET", "/v1/jobs/abcd", lambda seen: (status, {"error": {"kind": kind, "message": "no good"}}))
    result = invoke(queen, env, "jobs", "show", "abcd")
    assert result.exit_code == code
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("rbee: no good")


def test_a_short_id_is_shown_and_followed_by_its_full_id(queen: ScriptedQueen, env: dict[str, Any]) -> None:
    queen.route("GET", "/v1/jobs/00000000", lambda seen: (200, {"job_id": JOB, "status": "completed", "events": 2}))
    queen.route("GET", f"/v1/jobs/{JOB}/stream", stream(narr(1, "a"), end_frame(2), DONE))
    result = invoke(queen, env, "jobs", "logs", "00000000")
    assert result.exit_code == 0, result.output
    assert queen.requests("GET")[-1].path.startswith(f"/v1/jobs/{JOB}/stream")
    queen.route("DELETE", "/v1/jobs/00000000", lambda seen: (409, {"job_id": JOB, "status": "completed"}))
    cancel = invoke(queen, env, "jobs", "cancel", "00000000")
    assert cancel.stdout == "job 00000000 had already finished: completed\n"

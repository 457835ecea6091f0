"""The keeper's rendering: where each event goes, colour rules, tables, and what ``rbee`` imports."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from rbee.keeper.cli import cli
from rbee.keeper.client import Event
from rbee.keeper.errors import JobEnded, RequestRefused, end_line, one_line, plain_reason, problems_line
from rbee.keeper.render import Renderer, format_narration, format_progress, format_summary
from rbee.keeper.tables import print_result


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def narration(human: str, level: str = "info", actor: str = "queen") -> Event:
    data = {"actor": actor, "action": "x", "human": human, "job_id": "job-1", "level": level, "ts": 1.0}
    return Event(1, "narration", json.dumps(data))


def token(i: int, text: str) -> Event:
    return Event(i, "token", json.dumps({"t": text, "i": i}))


def end(status: str = "completed", **fields: object) -> Event:
    data = {"job_id": "job-1", "status": status, "error": None, "duration_ms": 1234.0, **fields}
    return Event(99, "end", json.dumps(data))


@pytest.fixture(autouse=True)
def _colour_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)


def test_tokens_go_to_stdout_and_off_a_terminal_only_the_summary_to_stderr() -> None:
    out, err = io.StringIO(), io.StringIO()
    r = Renderer(out=out, err=err)
    r.live = True
    for event in (narration("Loading the model"), token(0, "Hello"), token(1, ", world"), end()):
        r.event(event)
    r.finish(summary=True)
    assert out.getvalue() == "Hello, world"  # redirected output is exactly the generated text
    assert err.getvalue() == "2 tokens, total 1.23 s\n"  # no narration, no status line: the summary
    assert r.tokens == 2
    assert r.end is not None and r.end["status"] == "completed"


def test_verbose_shows_the_narration_on_stderr() -> None:
    out, err = io.StringIO(), io.StringIO()
    r = Renderer(verbose=True, out=out, err=err)
    r.live = True
    for event in (narration("Loading the model"), token(0, "Hello"), end()):
        r.event(event)
    r.finish(summary=True)
    assert out.getvalue() == "Hello"
    assert err.getvalue().splitlines() == ["[queen] Loading the model", "1 token, total 1.23 s"]


def test_list_commands_show_no_narration_unless_verbose() -> None:
    out, err = io.StringIO(), io.StringIO()
    r = Renderer(out=out, err=err)
    for event in (narration("Running worker_list"), narration("worker_list failed: x", level="error"), end()):
        r.event(event)
    r.finish()
    assert err.getvalue() == ""  # the error is said once, by the command's own `rbee:` line


def test_infer_on_a_terminal_keeps_one_status_line_that_the_summary_replaces() -> None:
    def status(action: str, **fields: object) -> Event:
        data = {"actor": "queen", "action": action, "human": "...", "level": "info", **fields}
        return Event(1, "narration", json.dumps(data))

    queue = Event(2, "progress", json.dumps({"action": "queue", "done": 2, "total": 3, "unit": "position"}))
    out, err = io.StringIO(), Terminal()  # the text to a file, the status to the terminal
    r = Renderer(out=out, err=err)
    r.live = True
    r.event(queue)
    assert err.getvalue().endswith("queued: position 2 of 3 ...\x1b[0m")
    r.event(status("infer_spawn", hive_id="beta"))
    assert "loading the model on hive beta ..." in err.getvalue()
    r._progress_at = 0.0  # the line is redrawn at most ten times a second
    r.event(token(0, "Hi"))
    assert "generating: 1 token ..." in err.getvalue()
    r.event(end(tokens_out=1))
    r.finish(summary=True)
    screen = err.getvalue()
    assert "\n" not in screen[:-1]  # one line, redrawn in place, then the summary ends it
    assert screen.endswith("\r\x1b[2K\x1b[2m1 token, total 1.23 s\x1b[0m\n")
    assert out.getvalue() == "Hi"


def test_on_one_terminal_the_status_line_never_lands_in_the_text() -> None:
    screen = Terminal()
    r = Renderer(out=screen, err=screen)
    r.live = True
    r.event(narration("x"))
    r.event(Event(2, "progress", json.dumps({"action": "queue", "done": 1, "total": 1, "unit": "position"})))
    r.event(token(0, "Hello"))
    r.event(narration("First token", actor="worker"))
    r.event(token(1, " world"))
    r.event(end(tokens_out=2))
    r.finish(summary=True)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", screen.getvalue())
    assert plain.endswith("\r\x1b[2KHello world\n2 tokens, total 1.23 s\n")


def test_with_2_and_1_to_one_file_the_text_ends_its_line_before_stderr_says_anything() -> None:
    both = io.StringIO()
    r = Renderer(out=both, err=both, shared=True)
    r.live = True
    for event in (narration("Loading"), token(0, "to offer."), end(tokens_out=1)):
        r.event(event)
    r.finish(summary=True)
    assert both.getvalue() == "to offer.\n1 token, total 1.23 s\n"
    verbose = io.StringIO()
    r = Renderer(verbose=True, out=verbose, err=verbose, shared=True)
    for event in (token(0, "to offer."), narration("Generated 1 token", level="warn", actor="worker"), end()):
        r.event(event)
    r.finish()
    assert verbose.getvalue() == "to offer.\n[worker] warning: Generated 1 token\n"


def test_queen_check_steps_are_its_output_without_bookkeeping_or_warning_labels() -> None:
    out, err = io.StringIO(), io.StringIO()
    r = Renderer(out=out, err=err)
    r.steps = True
    for action, human, level in (("job_start", "Running queen_check", "info"), ("check", "Step one", "info"),
                                 ("check_levels", "A warning-level narration (expected)", "warn"),
                                 ("job_done", "queen_check completed", "info")):  # fmt: skip
        data = {"actor": "queen", "action": action, "human": human, "level": level}
        r.event(Event(1, "narration", json.dumps(data)))
    assert out.getvalue() == "  Step one\n  A warning-level narration (expected)\n"
    assert err.getvalue() == ""


def test_after_ctrl_c_nothing_of_the_job_is_shown() -> None:
    out, err = io.StringIO(), Terminal()
    r = Renderer(out=out, err=err)
    r.live = True
    r.event(token(0, "a"))
    r.cancelling = True
    r.close()
    for event in (token(1, "b"), narration("First token after 124 ms"), end("cancelled")):
        r.event(event)
    r.finish(summary=True)
    assert out.getvalue() == "a"
    shown = err.getvalue()
    assert "First token" not in shown and "total" not in shown  # no narration, no summary
    assert shown.endswith("\r\x1b[2K")  # the status line is gone


def test_quiet_hides_narration_but_not_tokens() -> None:
    out, err = io.StringIO(), io.StringIO()
    r = Renderer(quiet=True, out=out, err=err)
    r.event(narration("step"))
    r.event(token(0, "text"))
    r.notice("Started queen-rbee")
    assert out.getvalue() == "text"
    assert err.getvalue() == ""


def test_json_mode_prints_every_event_as_one_parseable_line() -> None:
    out, err = io.StringIO(), io.StringIO()
    r = Renderer(json_mode=True, out=out, err=err)
    for event in (narration("step"), token(0, "a\nb"), Event(3, "result", '{"hives": []}'), end()):
        r.event(event)
    r.finish(summary=True)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["narration", "token", "result", "end"]
    assert all(set(line) == {"id", "event", "data"} for line in lines)
    assert lines[1]["data"]["t"] == "a\nb"
    assert err.getvalue() == ""


def test_narration_is_dimmed_on_a_terminal_and_warnings_say_so() -> None:
    err = Terminal()
    r = Renderer(verbose=True, out=io.StringIO(), err=err)
    r.event(narration("quiet step"))
    r.event(narration("look here", level="warn"))
    lines = err.getvalue().splitlines()
    assert lines[0] == "\x1b[2m[queen] quiet step\x1b[0m"
    assert "warning: look here" in lines[1] and lines[1].startswith("\x1b[33m")


def test_no_color_turns_colour_off_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    err = Terminal()
    r = Renderer(verbose=True, out=io.StringIO(), err=err)
    r.event(narration("step"))
    assert err.getvalue() == "[queen] step\n"


def test_narration_cannot_drive_the_terminal() -> None:
    line = format_narration({"actor": "hive\x1b[31m", "human": "a\x1b]0;title\x07b\nc"}, colour=False)
    assert "\x1b" not in line and "\n" not in line and "\x07" not in line


def test_escape_sequences_in_tokens_are_dropped_on_a_terminal_only() -> None:
    tty, pipe = Terminal(), io.StringIO()
    Renderer(out=tty, err=io.StringIO()).event(token(0, "red\x1b[31m text\n"))
    Renderer(out=pipe, err=io.StringIO()).event(token(0, "red\x1b[31m text\n"))
    assert tty.getvalue() == "red text\n"
    assert pipe.getvalue() == "red\x1b[31m text\n"


def test_summary_on_a_terminal_names_speed_first_token_worker_and_hive() -> None:
    out, err = Terminal(), Terminal()
    r = Renderer(out=out, err=err)
    r.event(token(0, "Hi"))
    fields = {
        "tokens_out": 42,
        "tokens_per_s": 61.26,
        "ttft_ms": 182.4,
        "worker_id": "worker-a",
        "hive_id": "localhost",
    }
    r.event(end(**fields))
    r.finish(summary=True)
    assert out.getvalue() == "Hi\n"  # the line is ended on a terminal
    summary = err.getvalue()
    for part in ("42 tokens", "61.3 tokens/s", "first token 182 ms", "worker worker-a", "hive localhost"):
        assert part in summary


def test_summary_is_left_out_when_quiet_or_failed() -> None:
    for quiet, status in ((True, "completed"), (False, "failed")):
        err = Terminal()
        r = Renderer(quiet=quiet, out=Terminal(), err=err)
        r.event(end(status, tokens_out=3))
        r.finish(summary=True)
        assert err.getvalue() == ""


def test_progress_is_one_updating_line_on_a_terminal_and_nothing_otherwise() -> None:
    data = {"action": "queue", "done": 2, "total": 4, "unit": "position"}
    pipe = io.StringIO()
    Renderer(out=io.StringIO(), err=pipe).event(Event(1, "progress", json.dumps(data)))
    assert pipe.getvalue() == ""
    tty = Terminal()
    r = Renderer(verbose=True, out=io.StringIO(), err=tty)
    r.event(Event(1, "progress", json.dumps(data)))
    r.event(narration("Scheduled"))
    text = tty.getvalue()
    assert text.startswith("\r\x1b[2K") and "queue" in text and "50%" in text
    assert text.count("\n") == 1  # the progress line was replaced, not kept
    download = {"action": "model_download", "done": 5 << 20, "total": 10 << 20, "unit": "bytes"}
    assert format_progress(download).startswith("model download  5.0 MiB / 10.0 MiB")


def test_a_download_gets_a_bar_with_size_and_rate_and_lines_print_above_it(monkeypatch: pytest.MonkeyPatch) -> None:
    data = {"action": "model_download", "done": 5 << 20, "total": 10 << 20, "unit": "bytes", "rate": 3 << 20,
            "file": "tiny.gguf"}  # fmt: skip
    pipe = io.StringIO()
    Renderer(out=io.StringIO(), err=pipe).event(Event(1, "progress", json.dumps(data)))
    assert pipe.getvalue() == ""  # not a terminal: no bar
    tty = Terminal()
    r = Renderer(verbose=True, out=io.StringIO(), err=tty)
    r.event(Event(1, "progress", json.dumps(data)))
    r.event(narration("Resuming"))
    r.event(Event(3, "progress", json.dumps({**data, "done": 10 << 20})))
    r.finish()
    text = tty.getvalue()
    for part in ("tiny.gguf", "5.0/10.0 MiB", "10.0/10.0 MiB", "3.0 MiB/s", "[queen] Resuming", "━"):
        assert part in text, part
    assert "\x1b[?25h" in text  # the cursor is shown again
    assert "\x1b[32m" in text  # coloured on a terminal

    monkeypatch.setenv("NO_COLOR", "1")
    tty = Terminal()
    r = Renderer(out=io.StringIO(), err=tty)
    r.event(Event(1, "progress", json.dumps(data)))
    r.finish()
    # Cursor movement is the bar's own; colour codes must be absent.
    plain = re.sub(r"\x1b\[(\?25[lh]|\d*[A-K]|2K)", "", tty.getvalue())
    assert "5.0/10.0 MiB" in plain and "\x1b[" not in plain


def test_end_line_reads_status_kind_and_message() -> None:
    data = {"status": "failed", "error": {"kind": "generation_error", "message": "the model\nbroke"}}
    assert end_line(data) == "failed: the model\nbroke"
    assert JobEnded(data).message == "failed: the model broke"
    cancelled = {"status": "cancelled", "error": {"kind": "cancelled", "message": "cancelled: cancelled by request"}}
    assert end_line(cancelled) == "cancelled"
    gone = {"status": "cancelled", "error": {"kind": "cancelled", "message": "client disconnected"}}
    assert end_line(gone) == "cancelled: client disconnected"
    late = {"status": "timed_out", "error": {"kind": "timed_out", "message": "the job ran past its 5 s deadline"}}
    assert end_line(late) == "timed out: the job ran past its 5 s deadline (give it more time with --timeout SECONDS)"


def test_errors_say_what_to_do_next_unless_they_already_do() -> None:
    lost = {"status": "failed", "error": {"kind": "worker_lost", "message": "worker w1 went away"}}
    hint = "(try again; `rbee status` shows the workers left)"
    assert end_line(lost) == f"failed: worker w1 went away {hint}"
    refused = RequestRefused.of(404, "no hive 'x' is known to the queen (known: a)", kind="hive_not_found")
    assert refused.message.endswith("(list hives with `rbee hive list`; add one with `rbee hive start`)")
    busy = "model tiny is in use by worker(s) w on hive b; stop them first (rbee worker stop w --hive b)"
    assert RequestRefused.of(409, busy, kind="model_not_found").message == busy
    assert RequestRefused.of(422, "temperature: too high", kind="invalid_operation").message == "temperature: too high"


def test_bad_input_exits_2_and_other_refusals_exit_1() -> None:
    assert RequestRefused.of(422, "temperature: too high", field="temperature").exit_code == 2
    assert RequestRefused.of(503, "no worker").exit_code == 1
    assert RequestRefused.of(404, "no job", kind="job_not_found").exit_code == 2  # an unknown job, model, hive
    assert RequestRefused.of(400, "ambiguous", kind="ambiguous_job_id").exit_code == 2
    assert RequestRefused.of(409, "hive offline", kind="hive_offline").exit_code == 1
    assert RequestRefused.of(429, "queue full", kind="queue_full").exit_code == 1
    assert one_line("a\n\tb\x1b") == "a b"


def test_validation_reasons_read_as_words_and_name_flags() -> None:
    problems = [
        {"field": "max_tokens", "reason": "Input should be greater than or equal to 1"},
        {"field": "top_p", "reason": "Input should be less than or equal to 1"},
        {"field": "stop.2", "reason": "String should have at least 1 character"},
        {"field": "stop", "reason": "List should have at most 4 items after validation, not 5"},
        {"field": "seed", "reason": "Input should be a valid integer, unable to parse string as an integer"},
        {"field": "operation", "reason": "Field required"},
    ]
    assert problems_line(problems) == (
        "--max-tokens must be at least 1; --top-p must be at most 1; --stop must not be empty; "
        "--stop takes at most 4 values; --seed must be a whole number; operation is required"
    )
    assert plain_reason("Value error, the prompt is too long") == "the prompt is too long"
    assert plain_reason("something else") == "something else"


def test_format_summary_counts_tokens_seen_when_the_end_has_no_count() -> None:
    assert format_summary({"status": "completed"}, 1) == "1 token"


def test_status_result_renders_tables() -> None:
    out = io.StringIO()
    result = {
        "hives": [
            {
                "hive_id": "localhost",
                "url": "http://127.0.0.1:7835",
                "state": "online",
                "last_heartbeat_s_ago": 0.5,
                "models": [{"id": "gemma3-270m-q4", "alias": "gemma3-270m"}],
                "workers": ["worker-a"],
            }
        ],
        "workers": [
            {
                "worker_id": "worker-a",
                "hive_id": "localhost",
                "model": "gemma3-270m",
                "device": "cpu",
                "state": "ready",
                "slots": 1,
                "busy_slots": 0,
                "queue": 0,
                "url": "http://127.0.0.1:9001",
            }
        ],
        "queues": {},
    }
    print_result(result, out=out, colour=False)
    text = out.getvalue()
    for part in ("hives", "localhost", "online", "gemma3-270m", "0.5 s ago", "workers", "worker-a", "0/1"):
        assert part in text
    assert "\x1b" not in text


def test_empty_lists_say_so() -> None:
    out = io.StringIO()
    print_result({"hives": [], "workers": [], "queues": {}}, out=out, colour=False)
    assert out.getvalue().splitlines() == ["No hives.", "No workers."]


def test_bad_flag_values_are_usage_errors() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--queen-url", "http://127.0.0.1:1", "infer", "--temperature", "abc", "hi"])
    assert result.exit_code == 2
    result = runner.invoke(cli, ["--queen-url", "http://127.0.0.1:1", "no-such-command"])
    assert result.exit_code == 2


def test_every_command_has_help_with_examples() -> None:
    runner = CliRunner()
    for args in (
        ["infer"],
        ["status"],
        ["queen-check"],
        ["hive", "list"],
        ["worker", "spawn"],
        ["worker", "list"],
        ["model", "list"],
        ["queen", "start"],
        ["jobs", "list"],
        ["jobs", "logs"],
    ):
        result = runner.invoke(cli, [*args, "--help"])
        assert result.exit_code == 0, args
        assert "Example" in result.output, args


FORBIDDEN = ("pydantic", "fastapi", "starlette", "rich", "pygments", "httpx", "rbee.contracts", "rbee.jobs")

_PROBE = """
import sys
from rbee.keeper.cli import main
sys.argv = ["rbee", "--queen-url", "http://127.0.0.1:1", "infer", "hello"]
try:
    main()
except SystemExit as exc:
    code = exc.code
forbidden = %r
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
print(code, loaded, sorted(m for m in sys.modules if m.startswith("rbee.wire")))
"""


def test_the_infer_path_imports_no_heavy_modules(tmp_path: os.PathLike[str]) -> None:
    env = {
        **os.environ,
        "RBEE_NO_AUTOSTART": "1",
        "RBEE_HOME": str(tmp_path),
        "RBEE_CONFIG": str(tmp_path / "none.toml"),
    }
    env.pop("RBEE_QUEEN_URL", None)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE % (FORBIDDEN,)], capture_output=True, text=True, env=env, timeout=60
    )
    # The keeper reads the stream through rbee.wire (its errors too, once there is one to show).
    wire = ["rbee.wire", "rbee.wire.protocol", "rbee.wire.sse"]
    assert proc.stdout.strip() == f"1 [] {wire}", proc.stderr
    assert proc.stderr.startswith("rbee: cannot reach the queen at http://127.0.0.1:1")


_WIRE_PROBE = """
import sys
import rbee.wire.errors, rbee.wire.http1, rbee.wire.protocol, rbee.wire.sse
print(sorted(m for m in sys.modules if m.startswith("rbee.")))
print(sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in %r))
"""


def test_the_wire_package_imports_only_the_standard_library_and_rbee_errors() -> None:
    third_party = ("pydantic", "fastapi", "starlette", "rich", "pygments", "httpx", "click", "anyio", "h11")
    proc = subprocess.run(
        [sys.executable, "-c", _WIRE_PROBE % (third_party,)], capture_output=True, text=True, timeout=60
    )
    ours, theirs = proc.stdout.splitlines()
    assert ours == str(
        ["rbee.errors", "rbee.wire", "rbee.wire.errors", "rbee.wire.http1", "rbee.wire.protocol", "rbee.wire.sse"]
    )
    assert theirs == "[]", proc.stderr


def test_on_a_shared_terminal_narration_waits_until_the_text_is_done() -> None:
    screen = Terminal()
    r = Renderer(verbose=True, out=screen, err=screen)
    r.event(narration("Scheduling"))
    r.event(token(0, "Hello"))
    r.event(narration("First token after 50 ms", actor="worker"))
    r.event(token(1, " world"))
    r.event(narration("Disk almost full", level="warn", actor="hive"))
    r.event(token(2, "!"))
    r.event(end())
    r.finish()
    lines = [line.replace("\x1b[2m", "").replace("\x1b[33m", "").replace("\x1b[0m", "") for line in
             screen.getvalue().splitlines()]  # fmt: skip
    assert r.verbose
    assert lines == [
        "[queen] Scheduling",
        "Hello world",  # a warning interrupts the text: it ends the line first
        "[hive] warning: Disk almost full",
        "!",
        "[worker] First token after 50 ms",
    ]

"""Operation contracts: every operation parses; bad input names the field and why."""

from __future__ import annotations

import json
from typing import Any, get_args

import pytest

from rbee.contracts import events
from rbee.contracts.operations import (
    DEFAULT_MODEL,
    HIVE_OPERATIONS,
    LIMITS,
    Infer,
    Operation,
    OperationBase,
    parse_keep_alive,
    parse_operation,
)
from rbee.errors import InvalidOperation

EXAMPLES: dict[str, dict[str, Any]] = {
    "status": {"operation": "status"},
    "queen_check": {"operation": "queen_check"},
    "hive_list": {"operation": "hive_list"},
    "infer": {
        "operation": "infer",
        "model": "gemma3-270m",
        "prompt": "Say hi\nin two lines\twith a tab",
        "max_tokens": 16,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "seed": 42,
        "stop": ["\n\n"],
        "hive_id": "localhost",
        "worker_id": "worker-1",
        "device": "cuda:0",
        "timeout_s": 30,
    },
    "hive_check": {"operation": "hive_check", "hive_id": "gpu-box"},
    "worker_spawn": {"operation": "worker_spawn", "hive_id": "localhost", "model": "org/repo:file.gguf"},
    "worker_list": {"operation": "worker_list"},
    "worker_get": {"operation": "worker_get", "worker_id": "worker-1"},
    "worker_stop": {"operation": "worker_stop", "worker_id": "worker-1"},
    "worker_stop_all": {"operation": "worker_stop_all", "model": "gemma3-270m", "hive_id": "gpu-box"},
    "model_list": {"operation": "model_list"},
    "model_get": {"operation": "model_get", "model": "gemma3-270m"},
    "model_download": {"operation": "model_download", "source": "https://example.com/m.gguf", "alias": "m"},
    "model_delete": {"operation": "model_delete", "model": "m"},
}


def all_operation_names() -> set[str]:
    union = get_args(Operation)[0]
    return {model.model_fields["operation"].default for model in get_args(union)}


def problem(raw: Any) -> InvalidOperation:
    with pytest.raises(InvalidOperation) as info:
        parse_operation(raw)
    return info.value


def test_examples_cover_every_operation() -> None:
    assert set(EXAMPLES) == all_operation_names()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_operation_parses_from_json_and_dict(name: str) -> None:
    raw = EXAMPLES[name]
    from_dict = parse_operation(raw)
    from_json = parse_operation(json.dumps(raw))
    from_bytes = parse_operation(json.dumps(raw).encode())
    assert isinstance(from_dict, OperationBase)
    assert from_dict == from_json == from_bytes
    assert from_dict.name == name


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_operation_round_trips_through_the_wire_format(name: str) -> None:
    op = parse_operation(EXAMPLES[name])
    wire = op.to_wire()
    assert wire["operation"] == name
    assert parse_operation(wire) == op


def test_hive_operations_are_the_forwarded_ones() -> None:
    # worker_stop_all runs on hives too, but the queen sends it to each hive concerned itself.
    for name, raw in EXAMPLES.items():
        assert parse_operation(raw).forwarded_to_hive == (name in HIVE_OPERATIONS and name != "worker_stop_all")


@pytest.mark.parametrize(
    ("given", "seconds"),
    [(300, 300.0), ("5m", 300.0), ("30s", 30.0), ("1h", 3600.0), ("1.5h", 5400.0), (-1, -1.0), ("-1", -1.0), (0, 0.0)],
)
def test_keep_alive_takes_seconds_and_durations(given: Any, seconds: float) -> None:
    assert parse_keep_alive(given) == seconds


@pytest.mark.parametrize("given", [-2, "-5m", "soon", "5 minutes", True, None, "31d"])
def test_keep_alive_refuses_what_is_not_a_duration(given: Any) -> None:
    with pytest.raises(ValueError):
        parse_keep_alive(given)


def test_infer_keep_alive_is_minus_one_zero_or_seconds() -> None:
    assert parse_operation({"operation": "infer", "prompt": "x", "keep_alive": -1}).keep_alive == -1  # type: ignore[attr-defined]
    with pytest.raises(InvalidOperation) as exc:
        parse_operation({"operation": "infer", "prompt": "x", "keep_alive": -0.5})
    assert exc.value.field == "keep_alive"


def test_worker_stop_all_checks_its_names() -> None:
    with pytest.raises(InvalidOperation) as exc:
        parse_operation({"operation": "worker_stop_all", "model": "../etc"})
    assert exc.value.field == "model"


def test_infer_defaults() -> None:
    op = parse_operation({"operation": "infer", "prompt": "hi"})
    assert isinstance(op, Infer)
    assert op.model == DEFAULT_MODEL
    assert op.max_tokens >= 1 and 0 <= op.temperature <= 2
    assert op.timeout_s is None and op.hive_id is None


def test_operations_are_immutable() -> None:
    op = parse_operation({"operation": "infer", "prompt": "hi"})
    with pytest.raises(ValueError):
        op.prompt = "changed"  # type: ignore[misc]


# -- bad input -------------------------------------------------------------------------


def test_unknown_operation_names_the_operation_field() -> None:
    exc = problem({"operation": "format_disk"})
    assert exc.field == "operation"
    assert "format_disk" in exc.message and "unknown operation" in exc.message


def test_missing_operation_names_the_operation_field() -> None:
    exc = problem({"prompt": "hi"})
    assert exc.field == "operation"
    assert "missing" in exc.message


def test_unknown_field_is_refused_by_name() -> None:
    exc = problem({"operation": "infer", "prompt": "hi", "temprature": 0.5})
    assert exc.field == "temprature"
    assert "unknown field" in exc.message


def test_missing_required_field_is_named() -> None:
    exc = problem({"operation": "infer"})
    assert exc.field == "prompt"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", LIMITS.top_k + 1),
        ("top_k", 2**31),
        # Strict types: a string or a boolean is not a number, a number is not a boolean.
        ("max_tokens", "10"),
        ("max_tokens", True),
        ("temperature", "0.5"),
        ("seed", 1.5),
        ("stream", 1),
        ("stream", "yes"),
        ("max_tokens", 0),
        ("max_tokens", LIMITS.max_tokens + 1),
        ("seed", -1),
        ("timeout_s", 0),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", [""]),
        ("device", "tpu"),
        ("hive_id", "has space"),
        ("worker_id", "a/b"),
    ],
)
def test_out_of_range_field_is_named_with_the_reason(field: str, value: Any) -> None:
    exc = problem({"operation": "infer", "prompt": "hi", field: value})
    assert exc.field == field
    assert exc.message.startswith(f"{field}: ")
    assert len(exc.message) > len(field) + 2  # a reason follows
    assert exc.data["problems"][0]["field"] == field


def test_wrong_type_is_named() -> None:
    exc = problem({"operation": "infer", "prompt": "hi", "max_tokens": "lots"})
    assert exc.field == "max_tokens"


def test_every_problem_is_reported() -> None:
    exc = problem({"operation": "infer", "prompt": "hi", "temperature": 9, "top_p": 9})
    assert {p["field"] for p in exc.data["problems"]} == {"temperature", "top_p"}


@pytest.mark.parametrize("bad", ["\x00", "\x07", "\x1b[31m", "\x7f", "\u202e"])
def test_prompt_with_control_characters_is_refused(bad: str) -> None:
    exc = problem({"operation": "infer", "prompt": f"hello {bad} world"})
    assert exc.field == "prompt"
    assert "control character" in exc.message


def test_prompt_may_hold_newlines_tabs_and_unicode() -> None:
    op = parse_operation({"operation": "infer", "prompt": "line 1\r\nline 2\ttab, caf\u00e9, \u4f60\u597d"})
    assert isinstance(op, Infer)


def test_overlong_prompt_is_refused() -> None:
    exc = problem({"operation": "infer", "prompt": "x" * (LIMITS.prompt_chars + 1)})
    assert exc.field == "prompt"
    assert str(LIMITS.prompt_chars) in exc.message


@pytest.mark.parametrize(
    ("operation", "field"),
    [("infer", "model"), ("worker_spawn", "model"), ("model_get", "model"), ("model_delete", "model")],
)
@pytest.mark.parametrize("ref", ["../etc/passwd", "models/../../x", "/abs/path", "bad name", "semi;colon", ""])
def test_model_refs_with_dotdot_or_odd_characters_are_refused(operation: str, field: str, ref: str) -> None:
    raw: dict[str, Any] = {"operation": operation, field: ref}
    if operation == "infer":
        raw["prompt"] = "hi"
    exc = problem(raw)
    assert exc.field == field


def test_model_download_alias_with_dotdot_is_refused() -> None:
    exc = problem({"operation": "model_download", "source": "https://x/y.gguf", "alias": "../evil"})
    assert exc.field == "alias"


@pytest.mark.parametrize("ref", ["gemma3-270m", "org/repo:model.Q4_K_M.gguf", "a.b_c-d"])
def test_good_model_refs_are_accepted(ref: str) -> None:
    assert parse_operation({"operation": "model_get", "model": ref}).model == ref  # type: ignore[attr-defined]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[]", b"null", b'"infer"'])
def test_malformed_bodies_are_invalid_operations(raw: bytes) -> None:
    exc = problem(raw)
    assert exc.field in ("body", "operation")
    assert exc.message


# -- events ----------------------------------------------------------------------------------


def test_end_event_parses_with_a_typed_status() -> None:
    end = events.parse_event_data(
        "end",
        {"job_id": "job-1", "status": "failed", "error": {"kind": "x", "message": "y"}, "duration_ms": 1.5},
    )
    assert end.status is events.JobStatus.FAILED
    assert end.error is not None and end.error.message == "y"


def test_terminal_states() -> None:
    assert {s.value for s in events.TERMINAL} == {"completed", "failed", "cancelled", "timed_out"}
    assert not events.JobStatus.RUNNING.terminal and events.JobStatus.TIMED_OUT.terminal

"""Property tests of the operation parser: any input is an operation or an InvalidOperation.

Raw bytes, any JSON value, and objects shaped like real operations (the right
tags, fields of every type and range) go through ``parse_operation``. Nothing
but :class:`InvalidOperation` ever comes out as an error, its field and
problems are always filled in, and what parses survives its wire form.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from rbee.contracts.operations import Operation, OperationBase, parse_operation
from rbee.errors import InvalidOperation

SETTINGS = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = [
    "status",
    "infer",
    "queen_check",
    "hive_list",
    "hive_check",
    "worker_spawn",
    "worker_list",
    "worker_get",
    "worker_stop",
    "model_list",
    "model_get",
    "model_download",
    "model_delete",
]
FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "hive_id",
    "worker_id",
    "device",
    "timeout_s",
    "stream",
    "source",
    "alias",
    "sha256",
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
# Values near the edges of what each field accepts, plus text that tries to get out of bounds.
tricky_text = st.sampled_from(
    ["", "gemma3-270m", "../etc/passwd", "/abs", "a..b", "cpu", "cuda:0", "cuda:100", "x" * 300, "tok\x00en", "\u202e"]
) | st.text(max_size=30)
field_values = (
    tricky_text
    | st.integers(min_value=-5, max_value=200_000)
    | st.floats(min_value=-1, max_value=100_000, allow_nan=False)
    | st.booleans()
    | st.none()
    | st.lists(tricky_text, max_size=6)
    | st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "robot"]), "content": tricky_text}
        ),
        max_size=3,
    )
)
shaped = st.builds(
    lambda name, fields: {"operation": name, **fields},
    st.sampled_from([*NAMES, "nope", ""]),
    st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=6),
)


def _check(raw: Any) -> OperationBase | None:
    try:
        op = parse_operation(raw)
    except InvalidOperation as exc:
        assert exc.field, exc
        assert exc.status_code == 422
        problems = exc.data["problems"]
        assert problems and all(p["field"] and p["reason"] for p in problems)
        return None
    assert isinstance(op, OperationBase)
    # What parsed goes over the wire and comes back the same.
    wire = op.to_wire()
    assert parse_operation(json.dumps(wire)) == op
    assert parse_operation(wire) == op
    return op


@SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_invalid_operation(raw: bytes) -> None:
    _check(raw)


@SETTINGS
@given(json_values)
def test_any_json_value_parses_or_raises_invalid_operation(value: Any) -> None:
    _check(json.dumps(value))
    if isinstance(value, dict):
        _check(value)


@SETTINGS
@given(shaped)
def test_operation_shaped_objects_parse_or_raise_invalid_operation(body: dict[str, Any]) -> None:
    op = _check(body)
    _check(json.dumps(body))
    if op is not None:
        assert op.name == body["operation"]


@SETTINGS
@given(st.sampled_from(NAMES))
def test_every_operation_with_defaults_only_is_judged_at_once(name: str) -> None:
    # Either its defaults make a whole operation or the missing field is named.
    try:
        op = parse_operation({"operation": name})
    except InvalidOperation as exc:
        assert exc.field and exc.field != "operation"
    else:
        assert TypeAdapter(Operation).validate_python(op.to_wire()) == op

"""Remote errors: every RbeeError lives in rbee.errors and comes back from the wire as itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rbee import errors
from rbee.wire.errors import KINDS, error_object, from_response, from_wire

SRC = Path(errors.__file__).parent


def _defined_outside_rbee_errors() -> list[str]:
    """Public classes under src/rbee, outside rbee/errors.py, that derive from an RbeeError (read, not imported)."""
    names = {"RbeeError", *(c.__name__ for c in KINDS.values())}
    found: list[str] = []
    classes = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "errors.py" and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases}
                classes.append((f"{path.relative_to(SRC)}:{node.name}", node.name, bases))
    grew = True
    while grew:  # subclasses of subclasses too
        grew = False
        for where, name, bases in classes:
            if bases & names and where not in found:
                names.add(name)
                found.append(where)
                grew = True
    return sorted(w for w in found if not w.rsplit(":", 1)[1].startswith("_"))


def _public_errors() -> list[type[errors.RbeeError]]:
    found = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.RbeeError)}
    return sorted(found - {errors.RbeeError}, key=lambda c: c.__name__)


def test_every_public_error_class_lives_in_rbee_errors_with_a_kind_of_its_own() -> None:
    assert _defined_outside_rbee_errors() == []
    classes = _public_errors()
    assert sorted(c.__name__ for c in classes) == sorted(n for n in errors.__all__ if n != "RbeeError")
    kinds = [c.kind for c in classes]
    assert len(kinds) == len(set(kinds))
    assert set(KINDS.values()) == set(classes)


@pytest.mark.parametrize("cls", _public_errors(), ids=lambda c: c.__name__)
def test_every_error_survives_to_wire_and_from_wire(cls: type[errors.RbeeError]) -> None:
    sent = cls(f"{cls.__name__} happened", detail=1)
    if isinstance(sent, errors.InvalidOperation):
        sent.field = "max_tokens"
        sent.data["problems"] = [{"field": "max_tokens", "reason": "must be at least 1"}]
    retry_after = None
    if isinstance(sent, errors.QueueFull):
        sent.retry_after_s = 7
        retry_after = "7"

    got = from_wire(sent.to_wire(), status=sent.status_code, retry_after=retry_after)

    assert type(got) is cls
    assert (got.kind, got.message, got.status_code) == (sent.kind, sent.message, sent.status_code)
    if isinstance(sent, errors.InvalidOperation):
        assert isinstance(got, errors.InvalidOperation)
        assert got.field == "max_tokens"
        assert got.data["problems"] == sent.data["problems"]
    if isinstance(sent, errors.QueueFull):
        assert isinstance(got, errors.QueueFull)
        assert got.retry_after_s == 7


def test_an_error_without_a_message_gets_its_class_default() -> None:
    got = from_wire({"kind": "model_not_found", "message": ""})
    assert type(got) is errors.ModelNotFound and got.message == "No such model."


def test_an_unknown_kind_keeps_the_remote_kind_status_and_data() -> None:
    got = from_wire({"kind": "something_new", "message": "a newer server said so", "extra": [1]}, status=418)
    assert type(got) is errors.RbeeError
    assert (got.kind, got.message, got.status_code, got.data) == (
        "something_new",
        "a newer server said so",
        418,
        {"extra": [1]},
    )


def test_an_answer_in_rbee_shape_is_rebuilt_with_its_retry_after_header() -> None:
    body = b'{"error": {"kind": "queue_full", "message": "the queue for m is full"}}'
    got = from_response(429, {"retry-after": "3"}, body)
    assert isinstance(got, errors.QueueFull) and got.retry_after_s == 3 and got.status_code == 429
    assert isinstance(from_response(429, {"retry-after": "soon"}, body), errors.QueueFull)


def test_an_answer_of_another_shape_keeps_its_status_and_text() -> None:
    got = from_response(502, {}, b"<html>Bad Gateway</html>")
    assert type(got) is errors.RbeeError
    assert got.status_code == 502 and got.message == "HTTP 502: <html>Bad Gateway</html>"
    assert error_object(b'{"error": "text"}') is None and error_object(b"[1]") is None


def test_every_kind_the_keeper_has_a_hint_for_is_a_kind_servers_send() -> None:
    from rbee.keeper.errors import HINTS

    assert set(HINTS) <= set(KINDS)

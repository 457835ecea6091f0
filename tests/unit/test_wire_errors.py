"""Remote errors: every RbeeError lives in rbee.errors and comes back from the wire as itself."""

from __future__ import annotations

import importlib

import pytest

from rbee import errors
from rbee.wire.errors import KINDS, error_object, from_response, from_wire

# Every module that defines errors, so that a subclass defined anywhere else would be seen.
_SERVERS = ("rbee.queen.app", "rbee.hive.app", "rbee.worker.app", "rbee.hive.download", "rbee.hive.gguf")


def _all_subclasses(cls: type[errors.RbeeError]) -> list[type[errors.RbeeError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_all_subclasses(sub)]
    return found


def _public_errors() -> list[type[errors.RbeeError]]:
    for name in _SERVERS:
        importlib.import_module(name)
    return sorted(
        {c for c in _all_subclasses(errors.RbeeError) if not c.__name__.startswith("_")}, key=lambda c: c.__name__
    )


def test_every_public_error_class_lives_in_rbee_errors_with_a_kind_of_its_own() -> None:
    classes = _public_errors()
    outside = [f"{c.__module__}.{c.__name__}" for c in classes if c.__module__ != "rbee.errors"]
    assert outside == []
    assert all(name in errors.__all__ for name in (c.__name__ for c in classes))
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

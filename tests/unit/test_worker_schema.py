"""JSON schemas to GBNF: integer bounds become exactly the integers in range."""

from __future__ import annotations

import re

import pytest

from rbee.worker.schema import integer_range, schema_grammar

BOUNDS = [
    (0, 9),
    (1, 5),
    (7, 7),
    (-5, 5),
    (-123, 4567),
    (10, 99),
    (10, 100),
    (99, 1000),
    (105, 987),
    (-1000, -10),
    (-9, -1),
    (0, None),
    (3, None),
    (10, None),
    (457, None),
    (None, 0),
    (None, -20),
    (None, 250),
    (-37, None),
    (None, None),
    (100, 100),
    (0, 0),
    (-1, 0),
    (199, 201),
    (1, 1000),
]


def _regex(lo: int | None, hi: int | None) -> re.Pattern[str]:
    return re.compile("|".join("".join(d.regex() for d in seq) for seq in integer_range(lo, hi)))


@pytest.mark.parametrize(("lo", "hi"), BOUNDS)
def test_an_integer_range_spells_exactly_its_integers(lo: int | None, hi: int | None) -> None:
    pattern = _regex(lo, hi)
    for n in range(-1500, 1501):
        inside = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert bool(pattern.fullmatch(str(n))) == inside, (lo, hi, n)
    # Never a leading zero, a "-0" or a "+".
    for text in ("007", "-0", "+5", "01", "-01", ""):
        assert not pattern.fullmatch(text)


def test_an_unbounded_side_reaches_sixteen_digits() -> None:
    assert _regex(5, None).fullmatch("9" * 16)
    assert not _regex(5, None).fullmatch("1" + "0" * 16)
    assert _regex(None, -5).fullmatch("-" + "9" * 16)


def test_an_empty_range_is_refused() -> None:
    with pytest.raises(ValueError, match="no integer"):
        integer_range(5, 4)
    with pytest.raises(ValueError, match="no integer"):
        schema_grammar({"type": "integer", "minimum": 3, "exclusiveMaximum": 3})


def test_the_grammar_carries_the_bounds_in_an_object() -> None:
    grammar = schema_grammar(
        {
            "type": "object",
            "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "name": {"type": "string"}},
            "required": ["stars", "name"],
        }
    )
    assert "[1-5]" in grammar
    assert 'stars-kv ::= "\\"stars\\"" space ":" space stars' in grammar
    # Without bounds the converter's own rules stay.
    assert "integral-part" in schema_grammar({"type": "integer"})


def test_exclusive_and_fractional_bounds_round_inwards() -> None:
    assert schema_grammar({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}) == schema_grammar(
        {"type": "integer", "minimum": 1, "maximum": 9}
    )
    assert schema_grammar({"type": "integer", "minimum": 0.5, "maximum": 3.5}) == schema_grammar(
        {"type": "integer", "minimum": 1, "maximum": 3}
    )


def test_a_non_negative_number_has_no_minus_sign() -> None:
    grammar = schema_grammar({"type": "number", "minimum": 0})
    root = next(line for line in grammar.splitlines() if line.startswith("root ::="))
    assert '"-"' not in root


@pytest.mark.parametrize("bad", [{"minimum": "1"}, {"maximum": float("inf")}, {"minimum": 10**20}])
def test_bad_bounds_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        schema_grammar({"type": "integer", **bad})

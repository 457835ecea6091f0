"""JSON schemas as GBNF grammars: llama-cpp-python's converter, with integer bounds.

The converter llama-cpp-python ships ignores ``minimum``/``maximum`` (its own
TODO), so ``{"type": "integer", "minimum": 1, "maximum": 5}`` let the model
write ``0`` or ``-7`` and the answer failed validation. :func:`schema_grammar`
runs the same converter with integers that carry bounds (``minimum``,
``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``) written as the
canonical decimals of that range and nothing else, digit by digit
(:func:`integer_range`). A ``number`` with a lower bound of 0 or more cannot be
negative; other bounds on non-integers are still not enforced.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["integer_range", "schema_grammar"]

#: Integers have at most this many digits, as the converter's own ``integral-part``.
MAX_DIGITS = 16


@dataclass(frozen=True, slots=True)
class _Digits:
    """``count`` digits from ``lo`` to ``hi`` (characters), or one exact ``text``."""

    lo: str = "0"
    hi: str = "9"
    count: tuple[int, int] = (1, 1)
    text: str | None = None

    def gbnf(self) -> str:
        if self.text is not None:
            return json.dumps(self.text)
        one = f"[{self.lo}]" if self.lo == self.hi else f"[{self.lo}-{self.hi}]"
        lo, hi = self.count
        return one if (lo, hi) == (1, 1) else f"{one}{{{lo},{hi}}}" if lo != hi else f"{one}{{{lo}}}"

    def regex(self) -> str:
        if self.text is not None:
            return "".join("\\" + c if c == "-" else c for c in self.text)
        one = f"[{self.lo}-{self.hi}]"
        lo, hi = self.count
        return one if (lo, hi) == (1, 1) else f"{one}{{{lo},{hi}}}"


_Seq = tuple[_Digits, ...]


def _same_length(lo: str, hi: str) -> list[_Seq]:
    """Digit strings of one length from ``lo`` to ``hi`` (leading zeros allowed: a suffix)."""
    n = len(lo)
    if n == 0:
        return [()]
    if lo == hi:
        return [(_Digits(text=lo),)]
    if lo == "0" * n and hi == "9" * n:
        return [(_Digits(count=(n, n)),)]
    if lo[0] == hi[0]:
        return [(_Digits(text=lo[0]), *rest) for rest in _same_length(lo[1:], hi[1:])]
    out: list[_Seq] = []
    first, last = int(lo[0]), int(hi[0])
    tail = n - 1
    if lo[1:] == "0" * tail:
        first -= 1  # lo's first digit needs no special case: it joins the middle
    else:
        out += [(_Digits(text=lo[0]), *rest) for rest in _same_length(lo[1:], "9" * tail)]
    whole_last = hi[1:] == "9" * tail
    middle_hi = last if whole_last else last - 1
    if first + 1 <= middle_hi:
        head = _Digits(str(first + 1), str(middle_hi))
        out.append((head, _Digits(count=(tail, tail))) if tail else (head,))
    if not whole_last:
        out += [(_Digits(text=hi[0]), *rest) for rest in _same_length("0" * tail, hi[1:])]
    return out


def _non_negative(lo: int, hi: int | None) -> list[_Seq]:
    """Canonical decimals (no leading zero) of ``lo..hi``; ``hi`` None: no upper bound."""
    out: list[_Seq] = []
    top = hi if hi is not None else 10**MAX_DIGITS - 1
    for length in range(len(str(lo)), len(str(top)) + 1):
        start = max(lo, 10 ** (length - 1) if length > 1 else 0)
        end = min(top, 10**length - 1)
        if start > end:
            continue
        if hi is None and start == 10 ** (length - 1) and length > 1:
            # Every longer number is in range too: one rule for all the remaining lengths.
            out.append((_Digits("1", "9"), _Digits(count=(length - 1, MAX_DIGITS - 1))))
            break
        out += _same_length(str(start), str(end))
    return out


def integer_range(lo: int | None, hi: int | None) -> list[_Seq]:
    """Alternatives that spell exactly the integers from ``lo`` to ``hi`` (None: unbounded)."""
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"no integer is at least {lo} and at most {hi}")
    out: list[_Seq] = []
    if lo is None or lo < 0:  # the negative part, as "-" and a magnitude
        magnitude_lo = 1 if hi is None or hi >= 0 else -hi
        magnitude_hi = None if lo is None else -lo
        minus = _Digits(text="-")
        out += [(minus, *seq) for seq in _non_negative(magnitude_lo, magnitude_hi)]
    if hi is None or hi >= 0:
        out += _non_negative(max(lo or 0, 0), hi)
    return out


def _gbnf(alternatives: list[_Seq]) -> str:
    return " | ".join(" ".join(d.gbnf() for d in seq) for seq in alternatives)


def _bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    lo: int | None = None
    hi: int | None = None

    def number(key: str) -> float | None:
        value = schema.get(key)
        if isinstance(value, bool) or value is None:
            return None
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{key}: must be a finite number")
        return value

    if (m := number("minimum")) is not None:
        lo = math.ceil(m)
    if (m := number("exclusiveMinimum")) is not None:
        lo = max(lo, math.floor(m) + 1) if lo is not None else math.floor(m) + 1
    if (m := number("maximum")) is not None:
        hi = math.floor(m)
    if (m := number("exclusiveMaximum")) is not None:
        hi = min(hi, math.ceil(m) - 1) if hi is not None else math.ceil(m) - 1
    limit = 10**MAX_DIGITS - 1
    if any(b is not None and not -limit <= b <= limit for b in (lo, hi)):
        raise ValueError(f"integer bounds must be within {MAX_DIGITS} digits")
    return lo, hi


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _converter() -> Any:
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    class Converter(SchemaConverter):  # type: ignore[misc]
        def visit(self, schema: Any, name: str) -> Any:
            if isinstance(schema, dict) and schema.get("type") in ("integer", "number"):
                bounded = any(k in schema for k in _BOUNDS)
                rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
                if bounded and schema["type"] == "integer":
                    return self._add_rule(rule_name, f"({_gbnf(integer_range(*_bounds(schema)))}) space")  # type: ignore[no-untyped-call]
                if bounded and _non_negative_number(schema):
                    self._add_primitive("integral-part", _primitive("integral-part"))
                    self._add_primitive("decimal-part", _primitive("decimal-part"))
                    rule = 'integral-part ("." decimal-part)? ([eE] [-+]? integral-part)? space'
                    return self._add_rule(rule_name, rule)  # type: ignore[no-untyped-call]
            return super().visit(schema, name)  # type: ignore[no-untyped-call]

    return Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)  # type: ignore[no-untyped-call]


def _non_negative_number(schema: dict[str, Any]) -> bool:
    _bounds(schema)  # checks them
    return any(
        isinstance(schema.get(k), int | float) and not isinstance(schema.get(k), bool) and schema[k] >= 0
        for k in ("minimum", "exclusiveMinimum")
    )


def _primitive(name: str) -> Any:
    from llama_cpp.llama_grammar import PRIMITIVE_RULES

    return PRIMITIVE_RULES[name]


def schema_grammar(schema: dict[str, Any]) -> str:
    """A JSON schema as a GBNF grammar; ``ValueError`` (with the reason) if it cannot be."""
    try:
        converter = _converter()
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "stdin")
        converter.visit(resolved, "")
        return str(converter.format_grammar())
    except RecursionError:
        raise ValueError("the schema is nested too deeply") from None
    except ValueError:
        raise
    except Exception as exc:  # the converter raises what it meets: KeyError, TypeError, AssertionError...
        raise ValueError(f"{type(exc).__name__}: {exc}") from None

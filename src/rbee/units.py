"""Durations and sizes as people write them: ``"5m"``, ``"1h"``, ``"1GiB"``. Stdlib only (the CLI imports it)."""

from __future__ import annotations

import re

__all__ = ["KEEP_ALIVE_MAX_S", "parse_keep_alive", "parse_size", "format_duration", "format_bytes"]

#: The longest keep-alive one may ask for (besides -1, for ever).
KEEP_ALIVE_MAX_S = 30 * 86_400.0

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def parse_keep_alive(value: object) -> float:
    """A keep-alive in seconds from a number or an Ollama-style duration (``"5m"``, ``"30s"``, ``"1h"``).

    -1 (or ``"-1"``, ``"-1s"``...) is for ever, 0 stops the worker right after
    its job; anything else negative, or over 30 days, raises ``ValueError``
    with the reason.
    """
    if isinstance(value, bool):
        raise ValueError("must be a number of seconds or a duration such as '5m', '30s', '1h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not a duration; give seconds or e.g. '5m', '30s', '1h', -1 or 0")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError("must be a number of seconds or a duration such as '5m', '30s', '1h'")
    if seconds != seconds or (seconds < 0 and seconds != -1):
        raise ValueError("must be -1 (for ever), 0 (stop after the job) or a positive duration")
    if seconds > KEEP_ALIVE_MAX_S:
        raise ValueError(f"must be at most {KEEP_ALIVE_MAX_S / 86_400:.0f} days")
    return seconds


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(text: str) -> int:
    """Bytes from ``"1073741824"``, ``"1GiB"``, ``"512MiB"``, ``"1.5GB"`` or ``"2G"`` (G: 10^9, GiB: 2^30)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size; give bytes or e.g. 512MiB, 1GiB, 2GB")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if "i" in unit:
        scale = 1024 ** ("kmgt".index(unit[0]) + 1)
    else:
        scale = _SIZE_UNITS[unit.rstrip("b") if unit != "b" else "b"]
    value = int(number * scale)
    if value <= 0:
        raise ValueError("must be more than 0 bytes")
    return value


def format_duration(seconds: float) -> str:
    """``45s``, ``4m 05s``, ``2h 03m``, ``3d 4h``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86_400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86_400}d {s % 86_400 // 3600}h"


def format_bytes(value: float) -> str:
    for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= scale:
            return f"{value / scale:.1f} {name}"
    return f"{value:.0f} B"

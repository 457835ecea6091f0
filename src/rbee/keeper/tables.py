"""Tables for results, jobs and the queen's info, drawn with rich.

Only the commands that show tables import this module, and rich is imported
inside the functions, so ``rbee infer`` never pays for it. A ``result`` is
operation-specific JSON; the layout follows its shape: each list of objects
becomes a table (columns chosen for the known kinds: hives, workers, models,
jobs), each object of plain values a two-column table, and the remaining
plain values one key/value table.
"""

from __future__ import annotations

import json
import time
from typing import IO, Any

from rbee.jobs.record import JobRecord

__all__ = [
    "print_result",
    "print_rows",
    "print_mapping",
    "print_job",
    "job_row",
    "cell",
    "label",
    "age",
    "prompt_of",
    "JOB_COLUMNS",
]

Column = tuple[str, str]  # (key, header)

_COLUMNS: dict[str, list[Column]] = {
    "hives": [
        ("hive_id", "hive"),
        ("state", "state"),
        ("url", "address"),
        ("devices", "devices"),
        ("workers", "workers"),
        ("models", "models"),
        ("last_heartbeat_s_ago", "last heartbeat"),
    ],
    "workers": [
        ("worker_id", "worker"),
        ("hive_id", "hive"),
        ("model", "model"),
        ("device", "device"),
        ("state", "state"),
        ("slots", "busy/slots"),
        ("queue", "queue"),
        ("url", "url"),
    ],
    "models": [
        ("id", "model"),
        ("alias", "alias"),
        ("size_bytes", "size"),
        ("architecture", "architecture"),
        ("quantization", "quant"),
    ],
}

JOB_COLUMNS: list[Column] = [
    ("short_id", "id"),
    ("operation", "operation"),
    ("model", "model"),
    ("prompt", "prompt"),
    ("status", "state"),
    ("age", "age"),
    ("tokens", "tokens"),
]

#: Headers that say more than the key does, or leave out a unit the value shows itself.
_LABELS = {
    "ttft_ms": "TTFT",
    "worker_ttft_ms": "worker TTFT",
    "tokens_per_s": "tokens/s",
    "last_heartbeat_s_ago": "last heartbeat",
    "n_ctx": "context",
    "worker_n_ctx": "worker context",
    "hive_id": "hive",
    "worker_id": "worker",
    "job_id": "id",
    "busy_slots": "busy slots",
    "tokens_in": "tokens in",
    "tokens_out": "tokens out",
}
_UNIT_SUFFIXES = ("_bytes", "_ms", "_s")


def label(key: str) -> str:
    """The header for a field: ``TTFT`` for ``ttft_ms`` (its value says "ms"), ``size`` for ``size_bytes``."""
    if key in _LABELS:
        return _LABELS[key]
    for suffix in _UNIT_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            key = key[: -len(suffix)]
            break
    return key.replace("_", " ")


def age(created_at: Any, now: float | None = None) -> str | None:
    """``12s ago``, ``3m ago``, ``2h ago``, ``4d ago``."""
    if not isinstance(created_at, int | float):
        return None
    seconds = max(0.0, (time.time() if now is None else now) - created_at)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def prompt_of(payload: dict[str, Any]) -> str | None:
    """The prompt an operation carries: an infer's, or a chat's last user message."""
    prompt = payload.get("prompt")
    if isinstance(prompt, str) and prompt:
        return prompt
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict)) or None
    return None


_STATUS_STYLE = {
    "completed": "green",
    "ready": "green",
    "online": "green",
    "running": "cyan",
    "busy": "cyan",
    "queued": "yellow",
    "starting": "yellow",
    "stale": "yellow",
    "failed": "red",
    "timed_out": "red",
    "dead": "red",
    "cancelled": "magenta",
}


def _size(value: float) -> str:
    for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= scale:
            return f"{value / scale:.1f} {name}"
    return f"{value:.0f} B"


def cell(key: str, value: Any, row: dict[str, Any] | None = None) -> str:
    """One value as table text."""
    row = row or {}
    if key == "slots" and "busy_slots" in row:
        return f"{row.get('busy_slots', 0)}/{row.get('slots', '?')}"
    if value is None or value == "":
        return "-"
    if key.endswith("_bytes") and isinstance(value, int | float) and not isinstance(value, bool):
        return _size(value)
    if key == "devices" and isinstance(value, list):
        return ", ".join(_device(d) for d in value if isinstance(d, dict)) or "-"
    if key == "last_heartbeat_s_ago" and isinstance(value, int | float):
        return f"{value:.1f} s ago"
    if key.endswith(("_at", "_since")) and isinstance(value, int | float) and value > 1e9:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if key.endswith("_ms") and isinstance(value, int | float):
        return f"{value:.0f} ms" if value < 10_000 else f"{value / 1000:.1f} s"
    if key == "tokens_per_s" and isinstance(value, int | float):
        return f"{value:.1f}"
    if key.endswith("_s") and isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:g} s" if float(value).is_integer() else f"{value:.1f} s"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        if all(isinstance(v, str | int | float) for v in value):
            return ", ".join(str(v) for v in value) or "-"
        names = [str(v.get("alias") or v.get("id") or v) for v in value if isinstance(v, dict)]
        return ", ".join(names) if names else json.dumps(value)
    if isinstance(value, dict):
        if set(value) == {"kind", "message"}:
            return f"{value['kind']}: {value['message']}"
        shown = [f"{label(k)} {cell(k, v, value)}" for k, v in value.items() if v is not None and v != ""]
        return ", ".join(shown) or "-"
    return str(value)


def _device(device: dict[str, Any]) -> str:
    """``cpu (16 cores, 62.7 GiB)`` or ``cuda:0 (NVIDIA H100, 79.6 GiB)``."""
    name = str(device.get("id") or device.get("kind") or "?")
    details = []
    if device.get("kind") == "cpu" and isinstance(device.get("cores"), int):
        details.append(f"{device['cores']} cores")
    elif device.get("name"):
        details.append(str(device["name"]))
    if isinstance(device.get("memory_bytes"), int | float):
        details.append(_size(device["memory_bytes"]))
    return f"{name} ({', '.join(details)})" if details else name


def _console(out: IO[str], colour: bool) -> Any:
    from rich.console import Console

    # Off a terminal rich assumes 80 columns; a wider page keeps rows whole in files and pipes.
    width = None if out.isatty() else 160
    return Console(file=out, no_color=not colour, color_system="auto" if colour else None, highlight=False, width=width)


def _styled(key: str, text: str, colour: bool) -> Any:
    if colour and key in ("state", "status") and text in _STATUS_STYLE:
        from rich.text import Text

        return Text(text, style=_STATUS_STYLE[text])
    return text


def print_rows(
    title: str | None, rows: list[dict[str, Any]], columns: list[Column] | None, *, out: IO[str], colour: bool
) -> None:
    """A table of objects; without ``columns``, the plain fields of the rows."""
    from rich.table import Table

    console = _console(out, colour)
    if not rows:
        console.print(f"No {title}." if title else "Nothing to show.")
        return
    if columns is None:
        keys: list[str] = []
        for row in rows:
            for key, value in row.items():
                if key not in keys and not isinstance(value, dict | list):
                    keys.append(key)
        columns = [(k, label(k)) for k in keys[:10]]
    table = Table(title=title, title_justify="left", header_style="bold" if colour else "")
    for key, header in columns:
        # Ids and model names are copied from here: never broken over lines.
        whole = key.endswith("_id") or key in ("model", "model_shown")
        table.add_column(header, overflow="fold", no_wrap=whole)
    for row in rows:
        table.add_row(*(_styled(k, cell(k, row.get(k), row), colour) for k, _ in columns))
    console.print(table)


def print_mapping(title: str | None, mapping: dict[str, Any], *, out: IO[str], colour: bool) -> None:
    """A two-column table of one object's fields."""
    from rich.table import Table

    console = _console(out, colour)
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("field", style="bold" if colour else "")
    table.add_column("value", overflow="fold")
    for key, value in mapping.items():
        table.add_row(label(key), _styled(key, cell(key, value, mapping), colour))
    console.print(table)


#: What ``rbee jobs show`` lists, in this order (the prompt and the output follow the table).
_JOB_FIELDS = (
    "job_id",
    "operation",
    "model",
    "status",
    "hive_id",
    "worker_id",
    "created_at",
    "age",
    "duration_ms",
    "ttft_ms",
    "tokens_in",
    "tokens_out",
    "tokens_per_s",
    "stop_reason",
    "failovers",
    "error",
)


def _duration(ms: float | None) -> str | None:
    if ms is None:
        return None
    return f"{ms:.0f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def job_row(job: dict[str, Any]) -> dict[str, Any]:
    """One row of ``rbee jobs list``: the job's record (:class:`JobRecord`) with what the columns show."""
    from rbee.keeper.errors import one_line
    from rbee.keeper.session import short_id

    record = JobRecord.from_wire(job)
    payload = record.payload or {}
    prompt = prompt_of(payload)
    error = record.error
    return {
        **job,
        "short_id": short_id(record.job_id),
        "model": payload.get("model"),
        "prompt": one_line(prompt, 30) if prompt else None,
        "age": age(job.get("created_at")),
        "duration": _duration(record.duration_ms),
        "tokens": record.tokens_out,
        "error": one_line(f"{error.get('kind')}: {error.get('message')}", 80) if error is not None else None,
    }


def print_job(job_id: str, job: dict[str, Any], *, out: IO[str], colour: bool) -> None:
    """``rbee jobs show``: the job's fields, its prompt and output, then its timeline.

    The timeline (``[{"step", "at_ms", "took_ms"}]`` from ``GET /v1/jobs/{id}``)
    is drawn as its own table, one step a row: when it began after the job was
    created, how long until the next step, and that time's share of the whole.
    """
    from rich.table import Table

    record = JobRecord.from_wire(job)
    payload = record.payload or {}
    known = {
        **job,
        "tokens_out": record.tokens_out,
        "duration_ms": record.duration_ms,
        "model": payload.get("model"),
        "age": age(job.get("created_at")),
    }
    fields = {k: known.get(k) for k in _JOB_FIELDS if known.get(k) is not None}
    if "failovers" in fields and isinstance(fields["failovers"], list):
        fields["failovers"] = len(fields["failovers"]) or None
    settings = {k: v for k, v in payload.items() if k not in ("operation", "model", "prompt", "messages")}
    if settings:
        fields["settings"] = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in settings.items())
    shown = {("state" if k == "status" else k): v for k, v in fields.items() if v is not None}
    print_mapping(job_id, shown, out=out, colour=colour)
    console = _console(out, colour)
    prompt = prompt_of(payload)
    for title, text in (("prompt", prompt), ("output", job.get("text"))):
        if isinstance(text, str) and text:
            from rich.text import Text

            console.print(Text(title, style="bold" if colour else ""))
            console.print(Text(text.rstrip("\n")), soft_wrap=True)
    steps = [row for row in job.get("timeline") or [] if isinstance(row, dict)]
    if not steps:
        return

    def ms(value: Any) -> str:
        if not isinstance(value, int | float):
            return "-"
        return f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.2f} s"

    whole = max((r["at_ms"] for r in steps if isinstance(r.get("at_ms"), int | float)), default=0.0)
    table = Table(title="timeline", title_justify="left", header_style="bold" if colour else "")
    table.add_column("step")
    for header in ("at", "took", "share"):
        table.add_column(header, justify="right")
    for row in steps:
        took = row.get("took_ms")
        share = f"{100 * took / whole:.0f}%" if isinstance(took, int | float) and whole > 0 else "-"
        table.add_row(str(row.get("step", "?")), ms(row.get("at_ms")), ms(took), share)
    console.print(table)


def print_result(data: Any, *, out: IO[str], colour: bool) -> None:
    """A ``result`` event's data, laid out by its shape."""
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        print_rows(None, data, None, out=out, colour=colour)
        return
    if not isinstance(data, dict):
        out.write(json.dumps(data, indent=2) + "\n")
        return
    plain: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, list) and all(isinstance(r, dict) for r in value) and (value or key in _COLUMNS):
            print_rows(key, value, _COLUMNS.get(key), out=out, colour=colour)
        elif isinstance(value, dict) and value:
            # One object (``{"worker": {...}}`` from a spawn): a table of its fields, nested ones in words.
            print_mapping(key, {k: v for k, v in value.items() if v is not None}, out=out, colour=colour)
        elif isinstance(value, dict) and not value:
            continue  # e.g. no queued jobs
        else:
            plain[key] = value
    if plain:
        print_mapping(None, plain, out=out, colour=colour)

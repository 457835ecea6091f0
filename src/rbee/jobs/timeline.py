"""The timeline of one job: when each step of its journey happened.

Derived from the job's own events (narration carries a wall-clock ``ts``; the
``end`` event carries ``ttft_ms`` and ``duration_ms``), so it works alike for a
live job and for one replayed from the history.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["STEPS", "timeline"]

#: step name -> the narration action that marks it (first occurrence wins).
STEPS: tuple[tuple[str, str], ...] = (
    ("started", "job_start"),
    ("scheduling", "infer_schedule"),
    ("queued", "infer_queued"),
    ("spawning worker", "infer_spawn"),
    ("worker chosen", "infer_worker"),
    ("dispatched", "infer_dispatch"),
)


def timeline(events: list[tuple[int, str, str]], created_at: float) -> list[dict[str, Any]]:
    """``[{"step", "at_ms", "took_ms"}]`` from creation to the end, in order."""
    marks: dict[str, float] = {"created": 0.0}
    wanted = {action: step for step, action in STEPS}
    end: dict[str, Any] | None = None
    for _id, kind, raw in events:
        if kind == "narration":
            if '"action"' not in raw:
                continue
            data = json.loads(raw)
            step = wanted.get(data.get("action", ""))
            if step is not None and step not in marks and isinstance(data.get("ts"), (int, float)):
                marks[step] = max(0.0, (data["ts"] - created_at) * 1000.0)
        elif kind == "end":
            end = json.loads(raw)
    if end is not None:
        if isinstance(end.get("ttft_ms"), (int, float)):
            marks["first token"] = float(end["ttft_ms"])
        if isinstance(end.get("duration_ms"), (int, float)):
            marks[f"end ({end.get('status')})"] = float(end["duration_ms"])
    ordered = sorted(marks.items(), key=lambda kv: kv[1])
    rows = []
    for n, (step, at) in enumerate(ordered):
        nxt = ordered[n + 1][1] if n + 1 < len(ordered) else None
        rows.append({"step": step, "at_ms": round(at, 3), "took_ms": None if nxt is None else round(nxt - at, 3)})
    return rows

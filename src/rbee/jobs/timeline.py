"""The steps of a job's journey, and the timeline of one job: when each step happened.

:class:`Step` is the one vocabulary: the timeline of ``GET /v1/jobs/{id}``
(and ``rbee jobs show``) names its rows with it, and the web page names the
step a live job is at with it (from what the scheduler publishes, see
:mod:`rbee.queen.placements`).

The timeline is derived from the job's own events (narration carries a
wall-clock ``ts``; the ``end`` event carries ``ttft_ms`` and ``duration_ms``),
so it works alike for a live job and for one replayed from the history.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

__all__ = ["STEPS", "Step", "timeline"]


class Step(StrEnum):
    """A step of a job's journey, as people read it."""

    CREATED = "created"
    STARTED = "started"
    SCHEDULING = "scheduling"
    QUEUED = "queued"
    SPAWNING = "spawning worker"
    PLACED = "worker chosen"
    DISPATCHED = "dispatched"
    RETRYING = "retrying"
    FIRST_TOKEN = "first token"


#: step -> the narration action that marks it in a job's log (first occurrence wins).
STEPS: tuple[tuple[Step, str], ...] = (
    (Step.STARTED, "job_start"),
    (Step.SCHEDULING, "infer_schedule"),
    (Step.QUEUED, "infer_queued"),
    (Step.SPAWNING, "infer_spawn"),
    (Step.PLACED, "infer_worker"),
    (Step.DISPATCHED, "infer_dispatch"),
    (Step.RETRYING, "infer_retry"),
)


def timeline(events: list[tuple[int, str, str]], created_at: float) -> list[dict[str, Any]]:
    """``[{"step", "at_ms", "took_ms"}]`` from creation to the end, in order."""
    marks: dict[str, float] = {Step.CREATED.value: 0.0}
    wanted = {action: step.value for step, action in STEPS}
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
            marks[Step.FIRST_TOKEN.value] = float(end["ttft_ms"])
        if isinstance(end.get("duration_ms"), (int, float)):
            marks[f"end ({end.get('status')})"] = float(end["duration_ms"])
    ordered = sorted(marks.items(), key=lambda kv: kv[1])
    rows = []
    for n, (step, at) in enumerate(ordered):
        nxt = ordered[n + 1][1] if n + 1 < len(ordered) else None
        rows.append({"step": step, "at_ms": round(at, 3), "took_ms": None if nxt is None else round(nxt - at, 3)})
    return rows

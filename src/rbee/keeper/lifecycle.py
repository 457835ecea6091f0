"""``rbee ps`` and ``rbee stop``: what is loaded where, and unloading it.

``rbee ps`` reads the queen's ``status`` and shows one row per worker: its
model, hive, how many slots are busy, the memory it holds, how long it has been
idle and when its hive unloads it (a countdown; ``never`` for a keep-alive of
-1). ``rbee stop MODEL`` runs ``worker_stop_all`` for the model (on one hive
or on all). :data:`KEEP_ALIVE` is the ``--keep-alive`` flag's type.

Like the rest of the keeper, this module imports only click and stdlib-only
rbee modules at start-up.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from rbee.keeper.errors import JobEnded, StreamBroken
from rbee.keeper.options import CONTEXT, output_options, pass_session, print_json
from rbee.keeper.session import Session
from rbee.units import format_bytes, format_duration, parse_keep_alive

__all__ = ["KEEP_ALIVE", "ps", "stop", "ps_rows"]


class _KeepAlive(click.ParamType):
    """Seconds or a duration (``5m``, ``30s``, ``1h``); -1 keeps the model for ever, 0 unloads it after the job."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_keep_alive(str(value).strip())
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


KEEP_ALIVE = _KeepAlive()


def ps_rows(workers: list[dict[str, Any]], now: float | None = None) -> list[dict[str, Any]]:
    """The ``rbee ps`` rows of the status's workers: the fields as they are, plus what the table shows."""
    now = time.time() if now is None else now
    rows = []
    for w in sorted(workers, key=lambda w: (str(w.get("model")), str(w.get("hive_id")), str(w.get("worker_id")))):
        keep = w.get("keep_alive_s")
        idle_since, unloads_at = w.get("idle_since"), w.get("unloads_at")
        idle_for = max(0.0, now - idle_since) if isinstance(idle_since, int | float) else None
        unloads_in = max(0.0, unloads_at - now) if isinstance(unloads_at, int | float) else None
        if keep == -1:
            shown_unload = "never"
        elif unloads_in is not None:
            shown_unload = format_duration(unloads_in)
        elif isinstance(keep, int | float) and w.get("state") in ("ready", "busy"):
            shown_unload = f"{format_duration(keep)} after its job" if keep else "after its job"
        else:
            shown_unload = "-"
        memory = w.get("memory_bytes")
        rows.append(
            {
                **w,
                "idle_for_s": None if idle_for is None else round(idle_for, 3),
                "unloads_in_s": None if unloads_in is None else round(unloads_in, 3),
                "model_shown": (w.get("model_aliases") or [w.get("model")])[0],
                "slots_shown": f"{w.get('busy_slots', 0)}/{w.get('slots', '?')}",
                "memory_shown": format_bytes(memory) if isinstance(memory, int | float) else "-",
                "idle_shown": format_duration(idle_for) if idle_for is not None else "busy",
                "unloads_shown": shown_unload,
            }
        )
    return rows


_PS_COLUMNS = [
    ("model_shown", "model"),
    ("hive_id", "hive"),
    ("worker_id", "worker"),
    ("state", "state"),
    ("slots_shown", "slots"),
    ("memory_shown", "memory"),
    ("idle_shown", "idle"),
    ("unloads_shown", "unloads in"),
]


def _status(session: Session) -> dict[str, Any]:
    job_id = session.submit({"operation": "status"})
    result: dict[str, Any] | None = None
    for event in session.client.events(job_id):
        if event.kind == "result" and isinstance(event.data, dict):
            result = event.data
        elif event.kind == "end":
            if event.data.get("status") != "completed":
                raise JobEnded(event.data)
            break
    if result is None:
        raise StreamBroken("the queen's status had no result")
    return result


@click.command("ps", context_settings=CONTEXT, short_help="Show what is loaded where.")
@click.option("--hive", "hive_id", metavar="HIVE_ID", help="Only the workers on this hive.")
@output_options
@pass_session
def ps(session: Session, hive_id: str | None) -> None:
    """Show the loaded models: one row per worker, with its hive, busy slots,
    memory, how long it has been idle and when it is unloaded.

    A worker is unloaded (stopped) once it has been idle for its keep-alive:
    the last job's --keep-alive, else its hive's default (5 minutes); "never"
    for -1.

    \b
    Examples:
      rbee ps
      rbee ps --hive beta
      rbee ps --json | jq '.workers[] | {model, unloads_in_s}'
    """
    workers = [w for w in _status(session).get("workers", []) if hive_id is None or w.get("hive_id") == hive_id]
    rows = ps_rows(workers)
    if session.json_mode:
        shown = {k for k, _ in _PS_COLUMNS if k.endswith("_shown")}
        print_json({"workers": [{k: v for k, v in row.items() if k not in shown} for row in rows]})
        return
    from rbee.keeper.tables import print_rows

    print_rows("loaded models", rows, _PS_COLUMNS, out=sys.stdout, colour=session.renderer.colour_out)


@click.command("stop", context_settings=CONTEXT, short_help="Unload a model: stop its workers.")
@click.argument("model")
@click.option("--hive", "hive_id", metavar="HIVE_ID", help="Only on this hive (default: every hive).")
@output_options
@pass_session
def stop(session: Session, model: str, hive_id: str | None) -> None:
    """Stop every worker of MODEL (its id or alias), on every hive or on one.

    Jobs still running on them end as if their worker was lost; the next
    `rbee infer` for the model starts a worker again.

    \b
    Examples:
      rbee stop gemma3-270m
      rbee stop tiny --hive beta
    """
    operation: dict[str, Any] = {"operation": "worker_stop_all", "model": model}
    if hive_id is not None:
        operation["hive_id"] = hive_id
    session.run(operation)

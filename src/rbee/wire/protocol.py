"""The job API's names on the wire: paths, headers, event names, job ids.

Every daemon serves the same job API and every client (the queen's, the
keeper's, the benchmarks') speaks it, so these are written once, here, and
imported from both sides. The event payloads are described by
:mod:`rbee.contracts.events`; this module holds only names and patterns, and
imports nothing but :mod:`re`.
"""

from __future__ import annotations

import re

__all__ = [
    "ACCEPT_EVENTS",
    "DONE",
    "EVENT_END",
    "EVENT_KINDS",
    "EVENT_MESSAGE",
    "EVENT_NARRATION",
    "EVENT_PROGRESS",
    "EVENT_RESULT",
    "EVENT_STREAM",
    "EVENT_TOKEN",
    "JOBS_PATH",
    "JOB_ID",
    "JOB_ID_HEADER",
    "JOB_ID_PREFIX",
    "LAST_EVENT_ID",
    "MIN_PREFIX_HEX",
    "PING_INTERVAL_S",
    "RETRY_AFTER",
    "is_job_id",
    "job_id_prefix",
    "job_path",
    "short_job_id",
    "stream_path",
]

#: The data of the frame after a job's ``end``: the stream is over.
DONE = "[DONE]"

# Event names (the SSE ``event:`` field) of a job's stream.
EVENT_NARRATION = "narration"
EVENT_TOKEN = "token"
EVENT_PROGRESS = "progress"
EVENT_RESULT = "result"
EVENT_END = "end"
#: What SSE calls a frame that names no event (only ``[DONE]`` is sent so).
EVENT_MESSAGE = "message"
EVENT_KINDS = frozenset({EVENT_NARRATION, EVENT_TOKEN, EVENT_PROGRESS, EVENT_RESULT, EVENT_END})

#: The content type of a job's stream.
EVENT_STREAM = "text/event-stream"
#: What a client sends to follow a stream (no cache may keep a live stream).
ACCEPT_EVENTS = {"Accept": EVENT_STREAM, "Cache-Control": "no-store"}
#: A client resuming a stream sends the last id it saw in this header; the server replays after it.
LAST_EVENT_ID = "Last-Event-ID"
#: ``429 queue_full`` says in this header how many seconds to wait.
RETRY_AFTER = "Retry-After"
#: The job an answer belongs to (a streamed submit's, an OpenAI-shaped answer's).
JOB_ID_HEADER = "x-rbee-job-id"

#: A server sends a ``: ping`` comment after this many quiet seconds on a stream.
PING_INTERVAL_S = 15.0

JOBS_PATH = "/v1/jobs"


def job_path(job_id: str) -> str:
    return f"{JOBS_PATH}/{job_id}"


def stream_path(job_id: str) -> str:
    return f"{JOBS_PATH}/{job_id}/stream"


JOB_ID_PREFIX = "job-"
# Patterns as text, compiled (and cached by re) on first use: the keeper imports this module on
# every run and uses neither on most.
#: A job's full id: ``job-`` and a UUID.
JOB_ID = r"^job-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
#: A short job id needs at least this many hex characters after ``job-`` (``job-43d5``, ``43d5b140``).
MIN_PREFIX_HEX = 4
_PREFIX = r"^(?:job-)?([0-9a-f][0-9a-f-]*)$"


def is_job_id(text: str) -> bool:
    """Whether ``text`` is a full job id (``job-`` and a UUID)."""
    return re.match(JOB_ID, text) is not None


def job_id_prefix(given: str) -> str | None:
    """``job-`` plus the hex start of an id, for a short id (``43d5b140``, ``job-43d5``); else None."""
    match = re.match(_PREFIX, given.strip().lower())
    if match is None or sum(ch != "-" for ch in match.group(1)) < MIN_PREFIX_HEX:
        return None
    return f"{JOB_ID_PREFIX}{match.group(1)}"


def short_job_id(job_id: str) -> str:
    """The first 8 hex characters of a job id (what ``rbee jobs`` shows and takes back)."""
    return job_id.removeprefix(JOB_ID_PREFIX)[:8] if job_id.startswith(JOB_ID_PREFIX) else job_id

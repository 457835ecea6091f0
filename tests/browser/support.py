"""Helpers for the browser tests: the system Chromium, screen sizes, jobs run by the test itself."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

__all__ = ["CHROMIUM_ARGS", "DOCS_SCREENSHOTS", "FAKE_ENV", "LAPTOP", "PHONE", "Event", "Ops", "chromium_path"]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LAPTOP = {"width": 1366, "height": 768}
PHONE = {"width": 390, "height": 844}
DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

# Each piece takes 40 ms, so a job of a few hundred tokens runs long enough to cancel.
FAKE_ENV = {"RBEE_FAKE_TOKENS": "2000", "RBEE_FAKE_DELAY_MS": "40"}


def chromium_path() -> str | None:
    for candidate in (os.environ.get("RBEE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class Event:
    kind: str
    data: Any


class Ops:
    """Jobs run on a queen from the test itself (not through the page).

    Synchronous on purpose: Playwright's sync API keeps an event loop running
    on the test's thread, so ``asyncio.run`` cannot be used beside it.
    """

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def run(self, op: dict[str, Any], timeout_s: float = 60) -> list[Event]:
        """Submit an operation and return all its events (the last one is ``end``)."""
        timeout = httpx.Timeout(10.0, read=timeout_s)
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout) as client:
            response = client.post("/v1/jobs", json=op)
            assert response.status_code == 201, response.text
            events = []
            with connect_sse(client, "GET", response.json()["sse_url"]) as source:
                for sse in source.iter_sse():
                    if sse.data == "[DONE]":
                        break
                    events.append(Event(sse.event, json.loads(sse.data)))
        return events

    def online_hives(self) -> set[str]:
        result = next(e.data for e in self.run({"operation": "hive_list"}) if e.kind == "result")
        return {h["hive_id"] for h in result["hives"] if h["state"] == "online"}

    def spawn_worker(self, hive_id: str) -> dict[str, Any]:
        events = self.run({"operation": "worker_spawn", "hive_id": hive_id}, timeout_s=120)
        assert events[-1].kind == "end" and events[-1].data["status"] == "completed", events[-1].data
        worker: dict[str, Any] = next(e.data for e in events if e.kind == "result")["worker"]
        return worker

    def workers(self) -> list[dict[str, Any]]:
        result = next(e.data for e in self.run({"operation": "status"}) if e.kind == "result")
        workers: list[dict[str, Any]] = result["workers"]
        return workers

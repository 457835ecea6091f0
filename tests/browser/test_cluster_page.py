"""The queen's web page in headless Chromium, against a real queen and hive (fake engine workers)."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from browser.support import FAKE_ENV, LAPTOP, PHONE, Ops
from cluster import Daemon, free_port, hive, queen, wait_for

pytestmark = pytest.mark.timeout(120)


def expect(target: Any) -> Any:
    from playwright.sync_api import expect as _expect

    return _expect(target)


def test_page_shows_the_hive_and_its_worker(
    fake_cluster: dict[str, Daemon], open_page: Callable[..., Any], shot: Callable[..., Path]
) -> None:
    q = fake_cluster["queen"]
    worker = Ops(q.url).spawn_worker("alpha")
    page = open_page(q.url + "/")
    card = page.locator("[data-hive='alpha']")
    expect(card).to_contain_text("online")
    expect(card).to_contain_text("CPU")
    expect(card).to_contain_text("gemma3-270m")
    row = page.locator(f"[data-worker='{worker['worker_id']}']")
    expect(row).to_contain_text("alpha")
    expect(row).to_contain_text("gemma3-270m")
    expect(row).to_contain_text(str(worker["pid"]))
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    expect(page.locator("[data-model='gemma3-270m']")).to_be_visible()
    shot(page, "cluster-laptop")
    phone = open_page(q.url + "/", PHONE)
    expect(phone.locator(f"[data-worker='{worker['worker_id']}']")).to_be_visible()
    shot(phone, "cluster-phone")


def test_prompt_in_the_playground_streams_tokens_beside_its_narration(
    fake_cluster: dict[str, Daemon], open_page: Callable[..., Any], shot: Callable[..., Path]
) -> None:
    page = open_page(fake_cluster["queen"].url + "/#/play")
    expect(page.locator("#play-model")).to_have_value("gemma3-270m")
    page.fill("#play-prompt", "Tell me about bees")
    page.fill("#play-max", "30")
    page.click("#play-run")
    # Tokens arrive while the job runs (40 ms apart), not all at the end.
    expect(page.locator("#play-output")).to_contain_text("tok2 ")
    assert page.locator("#play-output").get_attribute("data-status") is None
    shot(page, "playground-streaming")
    expect(page.locator("#play-output")).to_have_attribute("data-status", "completed")
    expect(page.locator("#play-output")).to_have_text("".join(f"tok{i} " for i in range(30)))
    narration = page.locator("#play-narration")
    expect(narration.locator("[data-action='infer_worker']")).to_contain_text("Scheduled on worker")
    expect(narration.locator("[data-action='job_done']").last).to_be_visible()
    expect(page.locator("#play-status")).to_contain_text("30 tokens")
    shot(page, "playground-done")


def test_cancel_button_stops_the_tokens_and_the_job_ends_cancelled(
    fake_cluster: dict[str, Daemon], open_page: Callable[..., Any], shot: Callable[..., Path]
) -> None:
    url = fake_cluster["queen"].url
    page = open_page(url + "/#/play")
    expect(page.locator("#play-model")).to_have_value("gemma3-270m")
    page.fill("#play-prompt", "Count for a long time")
    page.fill("#play-max", "1000")
    page.click("#play-run")
    expect(page.locator("#play-output")).to_contain_text("tok3 ")
    job_id = page.locator("#play-status a").get_attribute("href").rsplit("/", 1)[-1]
    # While it runs, the cluster page shows the job on its worker.
    cluster = open_page(url + "/")
    expect(cluster.locator(f"[data-worker] a[href='#/jobs/{job_id}']")).to_be_visible()
    expect(cluster.locator(f"[data-job='{job_id}']")).to_contain_text("running")
    shot(cluster, "cluster-job-running")
    expect(page.locator("#play-cancel")).to_be_enabled()
    page.click("#play-cancel")
    expect(page.locator("#play-output")).to_have_attribute("data-status", "cancelled")
    expect(page.locator("#play-cancel")).to_be_disabled()
    shown = page.locator("#play-output").inner_text()
    job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
    assert job["status"] == "cancelled"
    assert job["error"]["kind"] == "cancelled"
    assert job["tokens"] < 1000
    # Nothing arrives after the end.
    page.wait_for_timeout(300)
    assert page.locator("#play-output").inner_text() == shown
    shot(page, "playground-cancelled")
    expect(cluster.locator(f"[data-job='{job_id}']")).to_contain_text("cancelled")
    expect(cluster.locator(f"[data-worker] a[href='#/jobs/{job_id}']")).to_have_count(0)


def test_killed_worker_disappears_from_the_page_within_6_s(
    fake_cluster: dict[str, Daemon], open_page: Callable[..., Any], shot: Callable[..., Path]
) -> None:
    q = fake_cluster["queen"]
    worker = Ops(q.url).spawn_worker("alpha")
    page = open_page(q.url + "/")
    row = page.locator(f"[data-worker='{worker['worker_id']}']")
    expect(row).to_be_visible()
    os.kill(worker["pid"], signal.SIGKILL)
    expect(row).to_have_count(0, timeout=6_000)
    expect(page.locator("[data-hive='alpha']")).to_contain_text("online")
    shot(page, "worker-gone")


def test_job_page_shows_the_timeline_of_a_finished_job(
    fake_cluster: dict[str, Daemon], open_page: Callable[..., Any], shot: Callable[..., Path]
) -> None:
    url = fake_cluster["queen"].url
    events = Ops(url).run({"operation": "infer", "prompt": "timeline please", "max_tokens": 5})
    end = events[-1].data
    assert end["status"] == "completed"
    page = open_page(f"{url}/#/jobs/{end['job_id']}")
    timeline = page.locator("#job-timeline")
    for step in ("Submitted", "Started", "Scheduling", "Worker chosen", "Dispatched", "First token", "End: completed"):
        expect(timeline.locator(f"[data-step='{step}']")).to_be_visible()
    expect(timeline.locator("[data-step='Worker chosen']")).to_contain_text(end["worker_id"])
    expect(timeline.locator("[data-step='First token']")).to_contain_text(re.compile(r"\+\d"))
    expect(page.locator("#job-output")).to_have_text("tok0 tok1 tok2 tok3 tok4 ")
    expect(page.locator("#job-events [data-kind='end']")).to_contain_text("completed")
    expect(page.locator("#job-title")).to_contain_text("completed")
    shot(page, "job-page")


def test_job_page_reads_a_job_from_the_history_after_a_queen_restart(
    tmp_path: Path, open_page: Callable[..., Any], shot: Callable[..., Path]
) -> None:
    port = free_port()
    q = queen(tmp_path / "queen", port).start()
    h = hive(tmp_path / "hive", free_port(), q.url, "alpha", "--worker-engine", "fake", env=FAKE_ENV).start()
    try:
        wait_for(lambda: "alpha" in Ops(q.url).online_hives(), 15)
        events = Ops(q.url).run({"operation": "infer", "prompt": "remember me", "max_tokens": 3})
        job_id = events[-1].data["job_id"]
        q.stop()
        q = queen(tmp_path / "queen", port).start()
        page = open_page(f"{q.url}/#/jobs/{job_id}")
        expect(page.locator("#job-timeline [data-step='End: completed']")).to_be_visible()
        expect(page.locator("#job-timeline [data-step='Worker chosen']")).to_be_visible()
        expect(page.locator("#job-output")).to_have_text("tok0 tok1 tok2 ")
        expect(page.locator("#job-facts")).to_contain_text("remember me")
        shot(page, "job-page-history")
    finally:
        h.stop()
        q.stop()


def test_hives_coming_and_going_are_shown(
    fake_cluster: dict[str, Daemon], open_page: Callable[..., Any], tmp_path: Path, shot: Callable[..., Path]
) -> None:
    q = fake_cluster["queen"]
    page = open_page(q.url + "/")
    expect(page.locator("[data-hive='alpha']")).to_be_visible()
    beta = hive(tmp_path / "beta", free_port(), q.url, "beta", "--worker-engine", "fake", env=FAKE_ENV).start()
    gamma = hive(tmp_path / "gamma", free_port(), q.url, "gamma", "--worker-engine", "fake", env=FAKE_ENV).start()
    try:
        stopped = page.locator("[data-hive='beta']")
        killed = page.locator("[data-hive='gamma']")
        expect(stopped).to_contain_text("online")
        expect(killed).to_contain_text("online")
        shot(page, "two-hives")
        # A hive that stops says goodbye: offline at once.
        beta.stop()
        expect(stopped.locator(".badge")).to_have_text("offline", timeout=5_000)
        # One that dies says nothing: three missed heartbeats (2 s apart) make it stale.
        gamma.kill()
        expect(killed.locator(".badge")).to_have_text("stale", timeout=15_000)
    finally:
        beta.stop()
        gamma.stop()
    expect(page.locator("[data-hive='alpha'] .badge")).to_have_text("online")
    shot(page, "hive-stale")


def test_unknown_job_page_says_so(fake_cluster: dict[str, Daemon], open_page: Callable[..., Any]) -> None:
    page = open_page(fake_cluster["queen"].url + "/#/jobs/job-00000000-0000-0000-0000-000000000000")
    expect(page.locator("#job-error")).to_contain_text("No job")


def test_page_is_readable_at_laptop_and_phone_sizes(
    fake_cluster: dict[str, Daemon], open_page: Callable[..., Any]
) -> None:
    # Nothing sticks out sideways: no horizontal scrolling at either size.
    for viewport in (LAPTOP, PHONE):
        for route in ("/", "/#/play", "/#/chat"):
            page = open_page(fake_cluster["queen"].url + route, viewport)
            expect(page.locator("#conn")).to_have_attribute("data-state", "live")
            width = page.evaluate("() => document.documentElement.scrollWidth")
            assert width <= viewport["width"], (route, viewport, width)

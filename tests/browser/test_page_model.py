"""The page against ``queen-rbee --local-hive`` with the real model (Gemma 3 270M).

Also takes the laptop- and phone-size screenshots of the cluster page and the
playground (into ``docs/screenshots/`` with ``RBEE_DOCS_SCREENSHOTS=1``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from browser.support import LAPTOP, PHONE, Ops
from cluster import Daemon, free_port, queen, wait_for

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

# The model completes text (it is not tuned for chat): a sentence to finish reads best.
PROMPT = "Honey bees are important because"


def expect(target: Any) -> Any:
    from playwright.sync_api import expect as _expect

    return _expect(target)


@pytest.fixture(scope="module")
def local_queen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    q = queen(tmp_path_factory.mktemp("model-page"), free_port(), "--local-hive").start(timeout_s=120)
    try:
        wait_for(lambda: "localhost" in Ops(q.url).online_hives(), 30)
        yield q
    finally:
        q.stop()


def _run_prompt(page: Any, max_tokens: int) -> None:
    expect(page.locator("#play-model")).to_have_value("gemma3-270m")
    page.fill("#play-prompt", PROMPT)
    page.fill("#play-max", str(max_tokens))
    page.fill("#play-temp", "0")
    page.click("#play-run")


def test_playground_streams_the_real_model_and_the_page_shows_its_worker(
    local_queen: Daemon, open_page: Callable[..., Any], shot: Callable[..., Path]
) -> None:
    page = open_page(local_queen.url + "/#/play")
    _run_prompt(page, 48)
    expect(page.locator("#play-output")).not_to_be_empty(timeout=60_000)
    expect(page.locator("#play-output")).to_have_attribute("data-status", "completed", timeout=120_000)
    text = page.locator("#play-output").inner_text()
    assert len(text.strip()) > 20
    expect(page.locator("#play-narration [data-action='infer_worker']")).to_be_visible()
    expect(page.locator("#play-status")).to_contain_text("48 tokens")
    shot(page, "playground-laptop", docs=True)

    page.goto(local_queen.url + "/#/")
    card = page.locator("[data-hive='localhost']")
    expect(card).to_contain_text("online")
    worker = page.locator("[data-worker]")
    expect(worker).to_have_count(1)
    expect(worker).to_contain_text("gemma3-270m")
    expect(worker).to_contain_text("localhost")
    expect(page.locator("#jobs [data-job]").first).to_contain_text("completed")
    shot(page, "cluster-laptop", docs=True)

    phone = open_page(local_queen.url + "/", PHONE)
    expect(phone.locator("[data-worker]")).to_have_count(1)
    shot(phone, "cluster-phone", docs=True)
    phone.goto(local_queen.url + "/#/play")
    _run_prompt(phone, 32)
    expect(phone.locator("#play-output")).to_have_attribute("data-status", "completed", timeout=120_000)
    shot(phone, "playground-phone", docs=True)

    job_id = phone.locator("#play-status a").get_attribute("href").rsplit("/", 1)[-1]
    job_page = open_page(f"{local_queen.url}/#/jobs/{job_id}", LAPTOP)
    expect(job_page.locator("#job-timeline [data-step='First token']")).to_contain_text(re.compile(r"\+\d"))
    expect(job_page.locator("#job-timeline [data-step='End: completed']")).to_be_visible()
    shot(job_page, "job-laptop", docs=True)


def test_cancel_stops_the_real_model(
    local_queen: Daemon, open_page: Callable[..., Any], shot: Callable[..., Path]
) -> None:
    page = open_page(local_queen.url + "/#/play")
    _run_prompt(page, 400)
    expect(page.locator("#play-status")).to_contain_text(re.compile(r"\d+ tokens?"), timeout=60_000)
    page.click("#play-cancel")
    expect(page.locator("#play-output")).to_have_attribute("data-status", "cancelled", timeout=30_000)
    job_id = page.locator("#play-status a").get_attribute("href").rsplit("/", 1)[-1]
    job = httpx.get(f"{local_queen.url}/v1/jobs/{job_id}", timeout=10).json()
    assert job["status"] == "cancelled"
    assert job["tokens"] < 400
    shot(page, "playground-cancelled")

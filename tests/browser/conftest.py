"""Headless Chromium (Debian's ``chromium``) driven by Playwright, against real queens.

The browser is the system's: Playwright never downloads one here. Every test
module skips with the reason when Chromium or Playwright cannot be found.
Screenshots go to the test's ``tmp_path``; with ``RBEE_DOCS_SCREENSHOTS=1`` the
laptop- and phone-size ones also go to ``docs/screenshots/``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from browser.support import CHROMIUM_ARGS, DOCS_SCREENSHOTS, FAKE_ENV, LAPTOP, Ops, chromium_path
from cluster import Daemon, free_port, hive, queen, wait_for


# Module scope: while Playwright's sync API is active it keeps an event loop
# running on this thread, which the asyncio tests of other folders cannot share.
@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    executable = chromium_path()
    if executable is None:
        pytest.skip("Chromium not found (install Debian's package: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install -e '.[test]')")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def open_page(chromium: Any) -> Iterator[Callable[..., Any]]:
    """New pages, each in its own context (its own sessionStorage); JS errors fail the test."""
    from playwright.sync_api import expect

    expect.set_options(timeout=15_000)
    contexts: list[Any] = []
    errors: list[str] = []

    def open_(url: str, viewport: dict[str, int] = LAPTOP, **options: Any) -> Any:
        phone = viewport["width"] < 600
        context = chromium.new_context(
            viewport=viewport,
            device_scale_factor=2 if phone else 1,
            is_mobile=phone,
            has_touch=phone,
            **options,
        )
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not errors, f"errors in the page: {errors}"


@pytest.fixture
def shot(tmp_path: Path) -> Callable[..., Path]:
    """``shot(page, name, docs=False)``: a full-page screenshot into the test's ``tmp_path``."""

    def take(page: Any, name: str, *, docs: bool = False) -> Path:
        path = tmp_path / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        if docs and os.environ.get("RBEE_DOCS_SCREENSHOTS") == "1":
            DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOCS_SCREENSHOTS / path.name)
        return path

    return take


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    """A queen and one hive (``alpha``) whose workers run the scripted fake engine."""
    home = tmp_path_factory.mktemp("browser")
    q = queen(home / "queen", free_port()).start()
    h = hive(home / "hive", free_port(), q.url, "alpha", "--worker-engine", "fake", env=FAKE_ENV).start()
    try:
        wait_for(lambda: "alpha" in Ops(q.url).online_hives(), 15)
        yield {"queen": q, "hive": h}
    finally:
        h.stop()
        q.stop()

"""A queen with a token: the page asks for it once per tab, and no data leaves without it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from browser.support import FAKE_ENV, PHONE, Ops
from cluster import Daemon, free_port, hive, queen, wait_for

pytestmark = pytest.mark.timeout(120)

TOKEN = "browser-test-token-0123456789"


def expect(target: Any) -> Any:
    from playwright.sync_api import expect as _expect

    return _expect(target)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("guarded")
    env = {"RBEE_TOKEN": TOKEN}
    q = queen(home / "queen", free_port(), env=env).start()
    h = hive(home / "hive", free_port(), q.url, "alpha", "--worker-engine", "fake", env={**FAKE_ENV, **env}).start()
    try:
        wait_for(lambda: "alpha" in Ops(q.url, TOKEN).online_hives(), 15)
        yield q
    finally:
        h.stop()
        q.stop()


def test_only_the_page_shell_and_health_are_served_without_the_token(guarded: Daemon) -> None:
    url = guarded.url
    for path in ("/", "/static/app.js", "/static/app.css", "/health"):
        assert httpx.get(url + path, timeout=10).status_code == 200, path
    for path in ("/v1/cluster/events", "/v1/jobs", "/v1/info", "/static/../v1/info", "/docs"):
        assert httpx.get(url + path, timeout=10).status_code == 401, path
    # The shell is public for GET only, and holds no cluster data.
    assert httpx.post(url + "/", timeout=10).status_code == 401
    shell = httpx.get(url + "/", timeout=10)
    assert "alpha" not in shell.text
    assert "default-src 'self'" in shell.headers["content-security-policy"]
    assert httpx.get(url + "/static/nothing.js", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404


def test_page_asks_for_the_token_once_and_keeps_it_for_the_tab(
    guarded: Daemon, open_page: Callable[..., Any], shot: Callable[..., Path]
) -> None:
    page = open_page(guarded.url + "/")
    expect(page.locator("#view-login")).to_be_visible()
    expect(page.locator("#view-cluster")).to_be_hidden()
    expect(page.locator("[data-hive]")).to_have_count(0)
    shot(page, "token-asked")

    page.fill("#login-token", "not-the-token-at-all")
    page.click("#login-form button")
    expect(page.locator("#login-error")).to_contain_text("refused")
    expect(page.locator("[data-hive]")).to_have_count(0)

    page.fill("#login-token", TOKEN)
    page.click("#login-form button")
    expect(page.locator("[data-hive='alpha']")).to_contain_text("online")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    shot(page, "token-accepted")

    # Same tab: a reload does not ask again, and the playground works with the token.
    page.reload()
    expect(page.locator("[data-hive='alpha']")).to_be_visible()
    expect(page.locator("#view-login")).to_be_hidden()
    page.goto(guarded.url + "/#/play")
    expect(page.locator("#play-model")).to_have_value("gemma3-270m")
    page.fill("#play-prompt", "secret prompt")
    page.fill("#play-max", "4")
    page.click("#play-run")
    expect(page.locator("#play-output")).to_have_attribute("data-status", "completed")
    expect(page.locator("#play-output")).to_have_text("tok0 tok1 tok2 tok3 ")
    page.click("#play-status a")
    expect(page.locator("#job-timeline [data-step='End: completed']")).to_be_visible()
    expect(page.locator("#job-waterfall [data-step='Generation']")).to_be_visible()
    expect(page.locator("#job-input")).to_contain_text("secret prompt")

    # The chat sends, streams and stops with the token too.
    page.goto(guarded.url + "/#/chat")
    page.fill("#play-max", "3")
    page.fill("#chat-input", "hello with a token")
    page.press("#chat-input", "Enter")
    expect(page.locator("#chat-log > li[data-role='assistant']")).to_have_attribute("data-status", "completed")
    expect(page.locator("#chat-log > li[data-role='assistant'] .turn-text")).to_have_text("tok0 tok1 tok2 ")

    # A new tab (its own session storage) asks again.
    other = open_page(guarded.url + "/", PHONE)
    expect(other.locator("#view-login")).to_be_visible()
    shot(other, "token-asked-phone")

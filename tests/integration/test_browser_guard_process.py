"""A real ``queen-rbee`` process (no token, as ``rbee infer`` starts it) against what a web page
on another site can send: the issue's reproductions, refused; a configured origin, served."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from cluster import Daemon, free_port, queen

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    q = queen(tmp_path_factory.mktemp("guard"), free_port(), "--allow-origin", "https://chat.example").start()
    try:
        yield q
    finally:
        q.stop()


def _job_count(url: str) -> int:
    return len(httpx.get(url + "/v1/jobs", timeout=10).json()["jobs"])


def test_cross_site_post_and_rebound_read_are_refused(daemon: Daemon) -> None:
    before = _job_count(daemon.url)
    evil = {"Content-Type": "text/plain", "Origin": "http://evil.example", "Host": "evil.example"}
    r = httpx.post(daemon.url + "/v1/jobs", content=b'{"operation":"status"}', headers=evil, timeout=10)
    assert r.status_code == 403
    r = httpx.post(
        daemon.url + "/v1/jobs", content=b'{"operation":"status"}', headers={"Content-Type": "text/plain"}, timeout=10
    )
    assert r.status_code == 415
    r = httpx.get(daemon.url + "/v1/jobs?limit=2", headers={"Host": "attacker.example"}, timeout=10)
    assert r.status_code == 403 and "jobs" not in r.json()
    assert _job_count(daemon.url) == before


def test_the_configured_origin_gets_in_with_cors(daemon: Daemon) -> None:
    origin = {"Origin": "https://chat.example"}
    pre = httpx.options(
        daemon.url + "/v1/completions", headers={**origin, "Access-Control-Request-Method": "POST"}, timeout=10
    )
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "https://chat.example"
    r = httpx.post(daemon.url + "/v1/jobs", json={"operation": "status"}, headers=origin, timeout=10)
    assert r.status_code == 201 and r.headers["access-control-allow-origin"] == "https://chat.example"

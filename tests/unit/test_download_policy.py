"""The hives' download policy on its own, without the test session's allowances: no loopback,
link-local or own address, no redirect there, no local file outside the model directories."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from rbee.hive.policy import DownloadPolicy, DownloadRefused

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def _no_session_allowances(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RBEE_ALLOW_DOWNLOAD_FROM", raising=False)
    monkeypatch.delenv("RBEE_MODEL_DIRS", raising=False)


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.9.9.9",
        "localhost",
        "models.localhost",
        "::1",
        "[::1]",
        "169.254.169.254",
        "fe80::1",
        "0.0.0.0",
        "::ffff:127.0.0.1",
        "224.0.0.1",
    ],
)
def test_local_and_link_local_hosts_are_refused(host: str) -> None:
    with pytest.raises(DownloadRefused) as info:
        DownloadPolicy().check_host(host)
    assert info.value.status_code == 403 and info.value.field == "source"
    assert "--allow-download-from" in info.value.message


@pytest.mark.parametrize("host", ["example.org", "93.184.216.34", "10.0.0.5", "192.168.1.20", "2001:db8::1"])
def test_public_and_lan_hosts_pass(host: str) -> None:
    DownloadPolicy().check_host(host)


def test_the_allow_list_takes_networks_and_names(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = DownloadPolicy(allow=["127.0.0.0/8", "mirror.internal"])
    policy.check_host("127.0.0.2")
    policy.check_host("localhost")
    policy.check_host("mirror.internal")
    with pytest.raises(DownloadRefused):
        policy.check_host("169.254.1.1")
    monkeypatch.setenv("RBEE_ALLOW_DOWNLOAD_FROM", "169.254.0.0/16")
    DownloadPolicy().check_host("169.254.1.1")


def test_a_name_that_resolves_to_loopback_is_refused_when_fetched() -> None:
    policy = DownloadPolicy()
    policy.check_host("localtest.invalid")  # a name: only its resolution can tell
    policy.hosts.discard("localtest.invalid")

    async def resolve_to_loopback() -> None:
        loop = asyncio.get_running_loop()

        async def fake(host: str, port: object, **kw: object) -> list[tuple[object, ...]]:
            return [(2, 1, 6, "", ("127.0.0.1", 0))]

        loop.getaddrinfo = fake  # type: ignore[method-assign,assignment]
        await policy.check_url("http://localtest.invalid/model.gguf")

    with pytest.raises(DownloadRefused, match=r"127\.0\.0\.1"):
        asyncio.run(resolve_to_loopback())


def test_a_redirect_to_loopback_is_refused(tmp_path: Path) -> None:
    policy = DownloadPolicy()

    def app(request: httpx.Request) -> httpx.Response:
        if request.url.host == "93.184.216.34":
            return httpx.Response(302, headers={"Location": "http://127.0.0.1:9/v1/jobs"})
        return httpx.Response(200, content=b"secret")

    async def fetch() -> None:
        async def check(request: httpx.Request) -> None:
            await policy.check_url(str(request.url))

        transport = httpx.MockTransport(app)
        async with httpx.AsyncClient(transport=transport, follow_redirects=True, event_hooks={"request": [check]}) as c:
            await c.get("http://93.184.216.34/model.gguf")

    with pytest.raises(DownloadRefused, match="loopback"):
        asyncio.run(fetch())


def test_local_files_only_under_the_model_directories(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    extra = tmp_path / "srv"
    extra.mkdir()
    policy = DownloadPolicy(home=home, model_dirs=[extra])
    policy.check_path(home / "models" / "a.gguf")
    policy.check_path(extra / "sub" / "b.gguf")
    for outside in (Path("/etc/passwd"), Path("/no/such/file.gguf"), extra / ".." / "elsewhere.gguf"):
        with pytest.raises(DownloadRefused) as info:
            policy.check_path(outside)
        # The same words whether the file exists or not.
        assert "only under" in info.value.message and "passwd" not in info.value.message
    link = extra / "link.gguf"
    link.symlink_to("/etc/passwd")
    with pytest.raises(DownloadRefused):
        policy.check_path(link)  # a link out of the directory is outside it

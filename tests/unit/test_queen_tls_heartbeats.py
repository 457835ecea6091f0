"""A queen that serves TLS takes no hive it would have to call in clear off its machine:
its token would cross the network unencrypted."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from rbee.queen.app import QueenSettings, create_queen_app

pytestmark = pytest.mark.timeout(30)
TOKEN = "a-queen-token-0123456789"


@pytest.mark.parametrize(
    ("url", "tls", "status"),
    [
        ("http://192.0.2.7:9300", True, 403),  # another machine, in clear
        ("http://gpu-box.lan:9300", True, 403),
        ("https://192.0.2.7:9300", True, 200),
        ("http://127.0.0.3:9300", True, 200),  # this machine
        ("http://localhost:9300", True, 200),
        ("http://192.0.2.7:9300", False, 200),  # a queen without TLS says nothing about it
    ],
)
async def test_heartbeats_from_a_hive_reached_in_clear_off_the_machine(
    tmp_path: Path, url: str, tls: bool, status: int
) -> None:
    app = create_queen_app(QueenSettings(home=tmp_path, token=TOKEN))
    if tls:
        app.state.tls_fingerprint = "SHA256:" + "A" * 43
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://queen") as client,
    ):
        r = await client.post("/v1/hives/heartbeat", json={"hive_id": "beta", "url": url}, headers=headers)
        assert r.status_code == status, r.text
        if status == 403:
            assert "--tls auto" in r.json()["error"]["message"]
            assert app.state.queen.telemetry.hives() == []  # the refused hive was not recorded
        else:
            assert [h.hive_id for h in app.state.queen.telemetry.hives()] == ["beta"]

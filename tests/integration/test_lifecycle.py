"""Model lifecycle through real processes: keep-alive, `rbee ps`, `rbee stop`, `rbee worker stop --all`, goodbye.

A queen and a hive (scripted fake engine) as processes; the keeper is the real
``rbee`` run in a subprocess against the test queen (``--queen-url``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cluster import BIN, wait_for
from faults.support import MODEL, Cluster, end_of, follow, kinds, submit

pytestmark = pytest.mark.timeout(120)

FAKE = {"RBEE_FAKE_TOKENS": "16", "RBEE_FAKE_DELAY_MS": "5"}
INFER = {"operation": "infer", "model": MODEL, "prompt": "hello there", "max_tokens": 4}
#: The hive's heartbeat (and keep-alive check) interval; generous bounds below are several of these.
HEARTBEAT_S = 2.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("lifecycle"), {"alpha": FAKE})
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(autouse=True)
def _no_workers(cluster: Cluster) -> Iterator[None]:
    yield
    cluster.run({"operation": "worker_stop_all"})
    wait_for(lambda: not cluster.workers(), 15)


def rbee(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    home = cluster.root / "keeper"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RBEE_QUEEN_URL", "RBEE_TOKEN", "NO_COLOR")}
    env.update(RBEE_NO_AUTOSTART="1", RBEE_HOME=str(home), RBEE_CONFIG=str(home / "none.toml"))
    return subprocess.run(
        [str(BIN / "rbee"), "--queen-url", cluster.url, *args], capture_output=True, text=True, env=env, timeout=60
    )


def run_infer(cluster: Cluster, **fields: Any) -> tuple[dict[str, Any], list[str]]:
    events = follow(cluster.url, submit(cluster.url, {**INFER, **fields}), timeout_s=60)
    return end_of(events), [e["action"] for e in kinds(events, "narration")]


def ps_json(cluster: Cluster) -> list[dict[str, Any]]:
    done = rbee(cluster, "--json", "ps")
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout.splitlines()[-1])["workers"]
    return rows


def worker_ids(cluster: Cluster) -> set[str]:
    return {w["worker_id"] for w in cluster.workers()}


def test_keep_alive_2_s_unloads_the_worker_and_the_next_infer_loads_it_again(cluster: Cluster) -> None:
    end, _ = run_infer(cluster, keep_alive=2)
    assert end["status"] == "completed", end
    first = end["worker_id"]
    # While it idles, ps counts down to its unload (unless it is gone already, on a slow machine).
    rows = [r for r in ps_json(cluster) if r["worker_id"] == first]
    for row in rows:
        assert row["keep_alive_s"] == 2 and MODEL in [row["model"], *row["model_aliases"]] and row["hive_id"] == "alpha"
        assert 0 <= row["unloads_in_s"] <= 2
    # Gone within a heartbeat (or two, on a loaded machine) after its keep-alive.
    wait_for(lambda: first not in worker_ids(cluster), 2 + 3 * HEARTBEAT_S)
    log = cluster.hives["alpha"].log()
    assert "worker_unload" in log and first in log
    end, actions = run_infer(cluster)
    assert end["status"] == "completed" and end["worker_id"] != first, end
    assert "infer_spawn" in actions and "infer_spawned" in actions


def test_the_narration_says_how_long_loading_took(cluster: Cluster) -> None:
    events = follow(cluster.url, submit(cluster.url, INFER), timeout_s=60)
    (spawned,) = [n for n in kinds(events, "narration") if n["action"] == "infer_spawned"]
    assert "took" in spawned["human"] and spawned["load_ms"] >= 0


def test_keep_alive_minus_one_keeps_the_worker_and_ps_says_never(cluster: Cluster) -> None:
    end, _ = run_infer(cluster, keep_alive=-1)
    worker = end["worker_id"]
    time.sleep(2 * HEARTBEAT_S)
    assert worker in worker_ids(cluster)
    (row,) = [r for r in ps_json(cluster) if r["worker_id"] == worker]
    assert row["keep_alive_s"] == -1 and row["unloads_at"] is None
    table = rbee(cluster, "ps")
    assert table.returncode == 0, table.stderr
    line = next(line for line in table.stdout.splitlines() if worker in line)
    assert "never" in line and "alpha" in line and "0/1" in line


def test_ps_shows_a_countdown(cluster: Cluster) -> None:
    end, _ = run_infer(cluster, keep_alive=300)
    worker = end["worker_id"]
    wait_for(lambda: any(r["unloads_at"] for r in ps_json(cluster) if r["worker_id"] == worker), 3 * HEARTBEAT_S)
    (row,) = [r for r in ps_json(cluster) if r["worker_id"] == worker]
    assert row["keep_alive_s"] == 300 and 240 < row["unloads_in_s"] <= 300
    assert row["idle_for_s"] is not None and row["memory_bytes"] > 0
    table = rbee(cluster, "ps")
    line = next(line for line in table.stdout.splitlines() if worker in line)
    assert re.search(r"│ [45]m \d\ds ", line), line  # e.g. "4m 58s": minutes and seconds left
    assert "MiB" in line  # the memory it holds


def test_keep_alive_0_stops_the_worker_right_after_its_job(cluster: Cluster) -> None:
    end, _ = run_infer(cluster, keep_alive=0)
    assert end["status"] == "completed"
    wait_for(lambda: end["worker_id"] not in worker_ids(cluster), 3 * HEARTBEAT_S)


def test_rbee_stop_model_stops_its_workers(cluster: Cluster) -> None:
    a, b = cluster.spawn("alpha"), cluster.spawn("alpha")
    done = rbee(cluster, "--json", "stop", MODEL)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    (result,) = [e["data"] for e in events if e["event"] == "result"]
    assert {r["worker_id"] for r in result["stopped"]} == {a["worker_id"], b["worker_id"]}
    wait_for(lambda: not worker_ids(cluster), 10)
    cluster.assert_settled()


def test_rbee_worker_stop_all_on_a_hive(cluster: Cluster) -> None:
    cluster.spawn("alpha")
    done = rbee(cluster, "worker", "stop", "--all", "--hive", "alpha")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: not worker_ids(cluster), 10)


def test_bad_input_is_one_line_with_exit_code_2(cluster: Cluster) -> None:
    for args in (
        ("stop", "no-such-model"),
        ("worker", "stop"),
        ("worker", "stop", "w-1", "--all"),
        ("infer", "--keep-alive", "soon", "hi"),
        ("infer", "--keep-alive", "-5", "hi"),
        ("stop", MODEL, "--hive", "no-such-hive"),
    ):
        done = rbee(cluster, *args)
        assert done.returncode == 2, (args, done.returncode, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rbee: "), (args, done.stderr)


def test_the_api_names_the_field(cluster: Cluster) -> None:
    refused = httpx.post(cluster.url + "/v1/jobs", json={**INFER, "keep_alive": -3}, timeout=10)
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "keep_alive"
    refused = httpx.post(
        cluster.url + "/v1/jobs", json={"operation": "worker_stop_all", "model": "no-such-model"}, timeout=10
    )
    assert refused.status_code == 404 and refused.json()["error"]["message"].startswith("model: ")
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "keep_alive": "for a while"}
    refused = httpx.post(cluster.url + "/v1/completions", json=body, timeout=10)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "keep_alive"


def test_openai_keep_alive_durations_reach_the_worker(cluster: Cluster) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "keep_alive": "1h"}
    done = httpx.post(cluster.url + "/v1/completions", json=body, timeout=60)
    assert done.status_code == 200, done.text
    wait_for(lambda: any(w.get("keep_alive_s") == 3600 for w in cluster.workers()), 3 * HEARTBEAT_S)


def test_a_stopping_hive_says_goodbye_and_is_offline_at_once(cluster: Cluster) -> None:
    cluster.hive_env["beta"] = FAKE
    try:
        cluster.start_hive("beta")
        wait_for(lambda: cluster.hive_state("beta") == "online", 15)
        daemon = cluster.hives["beta"]
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.proc.wait(15)
        # The first look after it exited: offline, not online (and not stale a few seconds later).
        assert cluster.hive_state("beta") == "offline"
        assert "hive_goodbye" in cluster.queen.log() if cluster.queen is not None else True
        refused = httpx.post(cluster.url + "/v1/jobs", json={**INFER, "hive_id": "beta"}, timeout=10)
        assert refused.status_code == 409 and "stopped" in refused.json()["error"]["message"]
    finally:
        cluster.hives.pop("beta").stop()
        cluster.hive_env.pop("beta")

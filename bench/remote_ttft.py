"""Time to first token added by a hive one network hop away, side by side with a local hive.

    sudo .venv/bin/python -m bench.remote_ttft [--rounds 20] [--delay-ms 20]

Machines are network namespaces (tests/netns/support.py): the queen's, with a hive of
its own (the local hive); a far machine whose cable runs through a userspace delay line of
``--delay-ms`` each way (one round trip: twice that); the client in the root namespace.
Both hives run the scripted fake engine (no model time to hide the network's), one warm
worker each. Each round runs the same one-token job pinned to each hive, in alternating
order, and takes the client's time to its first token. The goal (issue "Hives on other
machines"): the far hive adds at most one round trip plus 5 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench._util import command_line, goal, print_goals, print_table, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cluster import BIN, Daemon
from netns.support import Network, available, wait_until

TOKEN = "bench-remote-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUEEN_PORT, LOCAL_HIVE_PORT, FAR_HIVE_PORT = 7833, 9301, 9302


def _ttft(client: httpx.Client, hive_id: str) -> float:
    op = {"operation": "infer", "prompt": "hi", "max_tokens": 1, "temperature": 0, "hive_id": hive_id}
    started = time.perf_counter()
    job = client.post("/v1/jobs", json=op).json()["job_id"]
    first: float | None = None
    with client.stream("GET", f"/v1/jobs/{job}/stream") as stream:
        kind = ""
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif kind == "token" and first is None and line.startswith("data: "):
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError(f"no token from the job on {hive_id}")
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    args = parser.parse_args()
    if (why := available()) is not None:
        raise SystemExit(f"bench.remote_ttft: {why}")
    home = Path(tempfile.mkdtemp(prefix="rbee-remote-ttft-"))
    env = {"RBEE_TOKEN": TOKEN, "RBEE_FAKE_TOKENS": "4", "RBEE_FAKE_DELAY_MS": "0"}
    rows: list[dict[str, Any]] = []
    with Network() as net:
        qm, far = net.add("queen"), net.add("far")
        queen_url = f"http://{qm.address}:{QUEEN_PORT}"
        daemons = [
            Daemon(
                "queen",
                qm.command(str(BIN / "queen-rbee"), "--host", qm.address, "--port", str(QUEEN_PORT)),
                home=home / "queen",
                url=queen_url,
                env=env,
            )
        ]
        for name, machine, port in (("local", qm, LOCAL_HIVE_PORT), ("far", far, FAR_HIVE_PORT)):
            hive = machine.command(
                str(BIN / "rbee-hive"),
                *("--host", machine.address, "--port", str(port), "--queen-url", queen_url),
                *("--hive-id", name, "--worker-engine", "fake"),
            )
            daemons.append(
                Daemon(f"hive-{name}", hive, home=home / name, url=f"http://{machine.address}:{port}", env=env)
            )
        try:
            for daemon in daemons:
                daemon.start()
            far.delay(args.delay_ms / 1000.0)
            with httpx.Client(base_url=queen_url, headers=AUTH, timeout=httpx.Timeout(10.0, read=60.0)) as client:
                for hive_id in ("local", "far"):  # a warm worker on each
                    wait_until(lambda h=hive_id: _safe(client, h), 60)
                for rnd in range(1, args.rounds + 1):
                    order = ("local", "far") if rnd % 2 else ("far", "local")
                    figures = {h: _ttft(client, h) * 1000.0 for h in order}
                    rows.append(
                        {
                            "round": rnd,
                            "local_ms": round(figures["local"], 1),
                            "far_ms": round(figures["far"], 1),
                            "added_ms": round(figures["far"] - figures["local"], 1),
                        }
                    )
        finally:
            for daemon in reversed(daemons):
                daemon.stop()
    print_table([list(r.values()) for r in rows], list(rows[0]))
    added = statistics.median(r["added_ms"] for r in rows)
    rtt = 2 * args.delay_ms
    print()
    print_goals(
        [
            goal(
                "TTFT added by a hive one hop away",
                f"<= one round trip + 5 ms ({rtt + 5:g} ms)",
                f"{added:.1f} ms median ({added / rtt:.2f} round trips)",
                added <= rtt + 5,
                added,
            )
        ]
    )
    print(f"command: {command_line()}")
    write_results("remote_ttft", {"command": command_line(), "args": vars(args), "rounds": rows, "added_ms": added})


def _safe(client: httpx.Client, hive_id: str) -> bool:
    try:
        _ttft(client, hive_id)
    except (httpx.HTTPError, RuntimeError, json.JSONDecodeError, KeyError):
        return False
    return True


if __name__ == "__main__":
    main()

"""Private networks of Linux network namespaces for the multi-machine tier.

Each machine of a test cluster is a network namespace with its own loopback and
one interface, ``eth0``, with an address in a private /24 used only here; the
``eth0``s are the far ends of veth pairs whose other ends sit on a bridge in a
switch namespace of their own. The root namespace (where pytest and the keeper
run) is one more port on that switch, with an address nothing listens on, so
every server of the tier binds inside a namespace the test made. A link cut is
``ip link set down`` on the machine's switch port; a machine lost is its
namespace deleted with everything in it; nothing is left when the network
closes. Needs root and ``ip``; :func:`available` says why not otherwise.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Machine", "Network", "available", "wait_until"]

_DELAY = Path(__file__).with_name("delay.py")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"rbee-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Machine:
    """One namespace: ``name`` for the test, ``ns`` for ``ip netns``, its address on the switch."""

    network: Network
    name: str
    ns: str
    port: str  # its veth end on the switch
    address: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this machine's namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def cut(self) -> None:
        """Pull the cable: its switch port goes down (the machine and its processes go on)."""
        _ip("-n", self.network.switch, "link", "set", self.port, "down")

    def restore(self) -> None:
        _ip("-n", self.network.switch, "link", "set", self.port, "up")

    def readdress(self, address: str) -> None:
        """Give it another address on the switch (the old one goes)."""
        _ip("-n", self.ns, "addr", "flush", "dev", "eth0")
        _ip("-n", self.ns, "addr", "add", f"{address}/24", "dev", "eth0")
        self.address = address

    def delay(self, seconds: float) -> None:
        """Put a delay line of ``seconds`` each way in its cable (:mod:`netns.delay`)."""
        self.network.delay(self, seconds)

    def pids(self) -> list[int]:
        listed = _ip("netns", "pids", self.ns, check=False)
        return [int(p) for p in listed.stdout.split()]

    def destroy(self) -> None:
        """The machine is gone: every process in it killed, its namespace and cable removed."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.processes:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        _ip("netns", "del", self.ns, check=False)
        _ip("-n", self.network.switch, "link", "del", self.port, check=False)
        self.network.machines.pop(self.name, None)


class Network:
    """A switch and the machines on it; ``with Network() as net:`` removes everything after."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 100000:05d}"
        self.subnet = f"10.213.{random.randint(1, 254)}"
        self.switch = f"rbee-sw-{self.tag}"
        self.machines: dict[str, Machine] = {}
        self._next = 10
        self._root_port = f"rbr{self.tag}"
        #: The root namespace's own address on the switch (a client only: nothing binds it).
        self.root_address = f"{self.subnet}.254"
        self._delays: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Network:
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            _ip("-n", self.switch, "link", "set", "lo", "up")
            _ip("link", "add", self._root_port, "type", "veth", "peer", "name", "root", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", "root", "master", "br0", "up")
            _ip("addr", "add", f"{self.root_address}/24", "dev", self._root_port)
            _ip("link", "set", self._root_port, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, name: str) -> Machine:
        """A new machine on the switch, with the next free address."""
        ns = f"rbee-{name}-{self.tag}"
        port = f"p-{name}"[:15]
        address = f"{self.subnet}.{self._next}"
        self._next += 1
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        machine = Machine(self, name, ns, port, address)
        self.machines[name] = machine
        return machine

    def delay(self, machine: Machine, seconds: float) -> None:
        """Cut ``machine``'s switch port from the bridge and join them through a userspace
        delay line instead: every frame each way arrives ``seconds`` later."""
        near, far = f"d-{machine.name}"[:15], f"e-{machine.name}"[:15]
        _ip("-n", self.switch, "link", "set", machine.port, "nomaster")
        _ip("-n", self.switch, "link", "add", near, "type", "veth", "peer", "name", far)
        _ip("-n", self.switch, "link", "set", near, "master", "br0", "up")
        _ip("-n", self.switch, "link", "set", far, "up")
        _ip("-n", self.switch, "link", "set", machine.port, "promisc", "on")
        _ip("-n", self.switch, "link", "set", far, "promisc", "on")
        line = [sys.executable, str(_DELAY)]
        for ns, names in [(m.ns, ["eth0"]) for m in self.machines.values()] + [
            (self.switch, [machine.port, near, far, "root"])
        ]:
            subprocess.run(["ip", "netns", "exec", ns, *line, "--offloads-off", *names], check=True, timeout=10)
        subprocess.run([*line, "--offloads-off", self._root_port], check=True, timeout=10)
        proc = subprocess.Popen(["ip", "netns", "exec", self.switch, *line, machine.port, far, str(seconds)])
        self._delays.append(proc)

    def next_address(self) -> str:
        address = f"{self.subnet}.{self._next}"
        self._next += 1
        return address

    def close(self) -> None:
        for proc in self._delays:
            proc.kill()
            proc.wait(5)
        for machine in list(self.machines.values()):
            machine.destroy()
        _ip("link", "del", self._root_port, check=False)
        _ip("netns", "del", self.switch, check=False)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this network still there (for the test that checks cleanup)."""
        names = _ip("netns", "list", check=False).stdout
        links = _ip("link", "show", check=False).stdout
        found = [line.split()[0] for line in names.splitlines() if self.tag in line]
        if self._root_port in links:
            found.append(self._root_port)
        return found


def wait_until(predicate: object, timeout_s: float, interval_s: float = 0.1) -> float:
    """Seconds until ``predicate()`` was true; AssertionError after ``timeout_s``."""
    start = time.monotonic()
    while True:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not true after {timeout_s} s: {predicate}")
        time.sleep(interval_s)

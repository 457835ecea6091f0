"""A userspace delay line between two interfaces: every Ethernet frame that arrives on one
leaves the other ``delay`` seconds later (``tc netem`` is not available everywhere).

Run inside the switch namespace of :mod:`netns.support`::

    python delay.py IFACE_A IFACE_B SECONDS

Frames are read and written with ``AF_PACKET`` sockets, so the interfaces' checksum and
segmentation offloads must be off (:func:`offloads_off`): a frame whose checksum the
kernel would fill in later, or a 64 KiB segment meant to be cut later, is not what the
other side may receive. Standard library only; it runs until killed.
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import select
import socket
import struct
import sys
import time

__all__ = ["offloads_off", "run"]

_SIOCETHTOOL = 0x8946
#: ethtool's legacy setters: tx checksum, TSO, GSO, GRO, rx checksum.
_OFFLOADS = (0x17, 0x1F, 0x24, 0x2B, 0x15)


def offloads_off(ifname: str) -> None:
    """Turn off the checksum and segmentation offloads of ``ifname`` (as ``ethtool -K``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for cmd in _OFFLOADS:
            value = ctypes.create_string_buffer(struct.pack("II", cmd, 0))
            request = struct.pack("16sP", ifname.encode(), ctypes.addressof(value))
            try:
                fcntl.ioctl(s, _SIOCETHTOOL, request)
            except OSError:
                pass  # a device without that feature


def _open(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
    s.bind((ifname, 0))
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    return s


def run(a: str, b: str, delay_s: float) -> None:
    ends = {}
    sa, sb = _open(a), _open(b)
    ends[sa], ends[sb] = sb, sa
    due: list[tuple[float, int, socket.socket, bytes]] = []
    n = 0
    while True:
        wait = max(0.0, due[0][0] - time.monotonic()) if due else 1.0
        ready, _, _ = select.select([sa, sb], [], [], wait)
        for s in ready:
            while True:
                try:
                    frame, address = s.recvfrom(65536)
                except BlockingIOError:
                    break
                if address[2] == socket.PACKET_OUTGOING:
                    continue  # our own send, seen on the way out
                n += 1
                heapq.heappush(due, (time.monotonic() + delay_s, n, ends[s], frame))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, out, frame = heapq.heappop(due)
            try:
                out.send(frame)
            except OSError:
                pass  # a lost frame, as on a wire


if __name__ == "__main__":
    if sys.argv[1] == "--offloads-off":
        for name in sys.argv[2:]:
            offloads_off(name)
    else:
        run(sys.argv[1], sys.argv[2], float(sys.argv[3]))

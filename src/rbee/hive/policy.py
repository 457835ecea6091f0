"""Where a hive may fetch a model from: the one policy every download source goes through.

A ``model_download`` makes the hive read a URL or a file on its behalf, so
without limits it is a way into the hive's network and disk. By default:

* URLs to loopback, link-local, unspecified or multicast addresses, to
  ``localhost``, and to the hive's own addresses are refused, at ``POST`` (a
  literal address or name) and again for every request the download makes (the
  name's addresses as resolved then, and every redirect). A LAN mirror stays
  possible: private ranges are not refused, and ``--allow-download-from
  CIDR|HOST`` (``RBEE_ALLOW_DOWNLOAD_FROM``, comma-separated) lets more in.
* Local files are read only under the model directories: ``$RBEE_HOME/models``
  and those given with ``--model-dir`` (``RBEE_MODEL_DIRS``, ``os.pathsep``-
  separated). A path elsewhere is refused before anything looks at it, so the
  answer says nothing about whether it exists.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from rbee.errors import DownloadRefused

__all__ = ["DownloadPolicy", "DownloadRefused"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _own_addresses() -> set[Address]:
    found: set[Address] = set()
    try:
        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    try:
                        found.add(ipaddress.ip_address(a.address.split("%", 1)[0]))
                    except ValueError:
                        continue
    except OSError:  # pragma: no cover - no interfaces to read
        pass
    return found


class DownloadPolicy:
    def __init__(self, *, allow: Iterable[str] = (), model_dirs: Iterable[Path] = (), home: Path | None = None) -> None:
        entries = [*allow, *(e.strip() for e in os.environ.get("RBEE_ALLOW_DOWNLOAD_FROM", "").split(","))]
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.hosts: set[str] = set()
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower().rstrip("."))
        dirs = [*model_dirs, *(Path(p) for p in os.environ.get("RBEE_MODEL_DIRS", "").split(os.pathsep) if p)]
        if home is not None:
            dirs.insert(0, home / "models")
        self.model_dirs = [Path(os.path.realpath(d.expanduser())) for d in dirs]
        self.own = _own_addresses()

    # -- addresses ------------------------------------------------------------

    def _allowed(self, ip: Address) -> bool:
        return any(ip in net for net in self.networks)

    def _blocked(self, ip: Address) -> str | None:
        if self._allowed(ip):
            return None
        if ip.is_loopback:
            return "a loopback address"
        if ip.is_link_local:
            return "a link-local address"
        if ip.is_unspecified or ip.is_multicast:
            return "not an address of a server"
        if ip in self.own:
            return "an address of this hive's own machine"
        mapped = getattr(ip, "ipv4_mapped", None)
        return self._blocked(mapped) if mapped is not None else None

    def _refuse(self, host: str, why: str) -> DownloadRefused:
        return DownloadRefused(
            f"source: this hive does not download from {host} ({why}); "
            "allow it where the hive starts with --allow-download-from",
            field="source",
        )

    def check_host(self, host: str) -> None:
        """At ``POST``: a literal address or a local name that is never allowed by default."""
        name = host.lower().rstrip(".").strip("[]")
        if name in self.hosts:
            return
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            local = name == "localhost" or name.endswith(".localhost")
            if local and not self._allowed(ipaddress.ip_address("127.0.0.1")):
                raise self._refuse(host, "this machine") from None
            return
        why = self._blocked(ip)
        if why is not None:
            raise self._refuse(host, why)

    async def check_url(self, url: str) -> None:
        """For every request a download makes: the host's addresses as they resolve now."""
        host = urlsplit(url).hostname or ""
        self.check_host(host)
        name = host.lower().rstrip(".")
        if name in self.hosts:
            return
        try:
            ipaddress.ip_address(name)
            return  # a literal, checked above
        except ValueError:
            pass
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except OSError:
            return  # the request itself will fail to connect, with its own error
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            why = self._blocked(ip)
            if why is not None:
                raise self._refuse(f"{host} ({ip})", why)

    # -- files ------------------------------------------------------------------

    def check_path(self, path: Path) -> None:
        real = Path(os.path.realpath(path))
        if any(real.is_relative_to(d) for d in self.model_dirs):
            return
        where = ", ".join(str(d) for d in self.model_dirs) or "nowhere"
        raise DownloadRefused(
            f"source: this hive reads local model files only under {where}; "
            "add a directory where the hive starts with --model-dir",
            field="source",
        )

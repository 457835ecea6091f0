"""The queen's settings: what ``queen-rbee`` is started with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbee.config import QUEEN_PORT
from rbee.wire.protocol import PING_INTERVAL_S

__all__ = ["QueenSettings"]


@dataclass
class QueenSettings:
    host: str = "127.0.0.1"
    port: int = QUEEN_PORT
    #: The admin token: every endpoint, every job, and what the queen sends to hives.
    token: str | None = None
    #: Further tokens (one per person or program): each sees only the jobs it created.
    user_tokens: tuple[str, ...] = ()
    home: Path | None = None
    local_hive: bool = False
    local_hive_port: int = 0
    queue_size: int = 64
    job_ttl_s: float = 600.0
    ping_interval_s: float = PING_INTERVAL_S
    heartbeat_interval_s: float = 2.0
    forget_after_s: float = 60.0
    hive_options: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

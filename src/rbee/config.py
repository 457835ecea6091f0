"""Configuration shared by every component: data directory, URLs, tokens."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "QUEEN_PORT",
    "HIVE_PORT",
    "rbee_home",
    "config_path",
    "load_config",
    "resolve_queen_url",
    "resolve_token",
    "is_loopback",
    "check_bind",
    "BindRefused",
    "KeeperConfig",
]

QUEEN_PORT = 7833
HIVE_PORT = 7835
MIN_TOKEN_CHARS = 16


def rbee_home() -> Path:
    """``$RBEE_HOME``, default ``~/.local/share/rbee``; created on first use."""
    raw = os.environ.get("RBEE_HOME")
    home = Path(raw).expanduser() if raw else Path.home() / ".local" / "share" / "rbee"
    home.mkdir(parents=True, exist_ok=True)
    return home


def config_path() -> Path:
    raw = os.environ.get("RBEE_CONFIG")
    if raw:
        return Path(raw).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME")
    return (Path(base) if base else Path.home() / ".config") / "rbee" / "config.toml"


@dataclass(frozen=True)
class KeeperConfig:
    queen_url: str | None = None
    token: str | None = None
    default_model: str | None = None
    sampling: dict[str, Any] | None = None


class ConfigError(ValueError):
    pass


def load_config(path: Path | None = None) -> KeeperConfig:
    path = path or config_path()
    if not path.exists():
        return KeeperConfig()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return KeeperConfig(
        queen_url=data.get("queen_url"),
        token=data.get("token"),
        default_model=data.get("default_model"),
        sampling=data.get("sampling"),
    )


def resolve_queen_url(flag: str | None = None, config: KeeperConfig | None = None) -> str:
    """``--queen-url``, else ``RBEE_QUEEN_URL``, else the config file, else the default."""
    if flag:
        return flag.rstrip("/")
    env = os.environ.get("RBEE_QUEEN_URL")
    if env:
        return env.rstrip("/")
    config = config if config is not None else load_config()
    if config.queen_url:
        return config.queen_url.rstrip("/")
    return f"http://127.0.0.1:{QUEEN_PORT}"


def resolve_token(flag: str | None = None, config: KeeperConfig | None = None) -> str | None:
    if flag:
        return flag
    env = os.environ.get("RBEE_TOKEN")
    if env:
        return env
    if config is not None and config.token:
        return config.token
    return None


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BindRefused(ValueError):
    pass


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback bind without a token of at least 16 characters."""
    if is_loopback(host):
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            raise BindRefused(f"the token must be at least {MIN_TOKEN_CHARS} characters")
        return
    if not token:
        raise BindRefused(f"binding {host} (not loopback) requires a token: pass --token or set RBEE_TOKEN")
    if len(token) < MIN_TOKEN_CHARS:
        raise BindRefused(f"the token must be at least {MIN_TOKEN_CHARS} characters")

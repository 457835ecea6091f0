"""Configuration shared by every component: data directory, URLs, tokens.

The keeper's file is TOML at ``$RBEE_CONFIG``, else
``$XDG_CONFIG_HOME/rbee/config.toml``, else ``~/.config/rbee/config.toml``::

    queen_url = "http://127.0.0.1:7833"
    token = "..."                 # RBEE_TOKEN overrides it
    default_model = "gemma3-270m"

    [sampling]                    # defaults for `rbee infer`; flags override them
    max_tokens = 256
    temperature = 0.7
    top_p = 0.95
    top_k = 40
    seed = 7
    stop = ["###"]

Environment variables override the file (``RBEE_QUEEN_URL``, ``RBEE_TOKEN``),
and flags override both. A file with an unknown key or a value of the wrong
type is refused with one line naming the file, the key and what it should be.
"""

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
    "ConfigError",
    "KeeperConfig",
    "SAMPLING_KEYS",
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
    """The config file cannot be used as written."""


#: The keys of ``[sampling]`` and what each must be.
SAMPLING_KEYS: dict[str, str] = {
    "max_tokens": "an integer",
    "temperature": "a number",
    "top_p": "a number",
    "top_k": "an integer",
    "seed": "an integer",
    "stop": "a string or a list of strings",
}
_TOP_KEYS = ("queen_url", "token", "default_model", "sampling")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sampling_ok(key: str, value: Any) -> bool:
    if key in ("max_tokens", "top_k", "seed"):
        return _is_int(value)
    if key in ("temperature", "top_p"):
        return _is_int(value) or isinstance(value, float)
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def load_config(path: Path | None = None) -> KeeperConfig:
    """Read and check the keeper's config file; a missing file is an empty config."""
    path = path or config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return KeeperConfig()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(_TOP_KEYS[:3])} and [sampling]")
    for key in ("queen_url", "token", "default_model"):
        if key in data and (not isinstance(data[key], str) or not data[key].strip()):
            raise ConfigError(f"{path}: {key} must be a non-empty string")
    sampling = data.get("sampling")
    if sampling is not None:
        if not isinstance(sampling, dict):
            raise ConfigError(f"{path}: sampling must be a table ([sampling])")
        for key, value in sampling.items():
            if key not in SAMPLING_KEYS:
                raise ConfigError(f"{path}: unknown key {key!r} in [sampling]; the keys are {', '.join(SAMPLING_KEYS)}")
            if not _sampling_ok(key, value):
                raise ConfigError(f"{path}: [sampling] {key} must be {SAMPLING_KEYS[key]} (got {value!r})")
        if isinstance(sampling.get("stop"), str):
            sampling = {**sampling, "stop": [sampling["stop"]]}
    return KeeperConfig(
        queen_url=data.get("queen_url"),
        token=data.get("token"),
        default_model=data.get("default_model"),
        sampling=sampling,
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

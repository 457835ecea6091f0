"""Fixtures shared by every tier.

The whole session runs with ``RBEE_HOME`` in a temporary directory, so no test
ever reads or writes the user's real rbee data, and with the keeper's queen
auto-start off unless a test turns it on. In-process apps are reached through
httpx's and Starlette's test transports, whose made-up host names
(``testserver``, ``worker``...) the servers' host check is told to accept.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import free_port

# Set at import, before any test module builds an app (schemathesis loads its schemas then).
os.environ["RBEE_ALLOW_HOSTS"] = "testserver,worker,queen,hive,test"
# The tests' model servers listen on loopback and their model files lie in temporary
# directories: the hives' download policy lets both in (tests/unit/test_download_policy.py
# checks the policy itself, without these).
os.environ["RBEE_ALLOW_DOWNLOAD_FROM"] = "127.0.0.0/8"
os.environ["RBEE_MODEL_DIRS"] = tempfile.gettempdir()


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("rbee-home")
    saved = {k: os.environ.get(k) for k in ("RBEE_HOME", "RBEE_CONFIG", "RBEE_QUEEN_URL", "RBEE_TOKEN")}
    os.environ["RBEE_HOME"] = str(home)
    os.environ["RBEE_CONFIG"] = str(home / "config.toml")
    os.environ.pop("RBEE_QUEEN_URL", None)
    os.environ.pop("RBEE_TOKEN", None)
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def port() -> int:
    return free_port()

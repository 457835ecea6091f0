"""The OpenAPI schemas of the queen, hive and worker, exercised with generated requests.

schemathesis builds requests from each app's own schema (valid and invalid
bodies, paths and query strings) and sends them in process. Every answer must
be documented: never a 500, every error status listed for its endpoint, with
the documented content type and error shape. Each server is tried with and
without a token (without one in the request, every protected endpoint must
answer its documented 401). Examples are bounded so the tier stays fast.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from rbee.hive.app import HiveSettings, create_hive_app
from rbee.queen.app import QueenSettings, create_queen_app
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.engine import FakeEngine

pytestmark = pytest.mark.timeout(120)

EXAMPLES = 30
TOKEN = "schema-test-token-0123456789"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
#: An endless event stream with no input to vary; its auth is tested in test_queen_tokens.py.
SKIP = {"GET /v1/cluster/events"}

_HOME = Path(tempfile.mkdtemp(prefix="rbee-schemathesis-"))


def _apps() -> dict[str, FastAPI]:
    # The hive's workers would be fake ones, and never start: no model file is generated.
    hive = {"home": _HOME / "hive", "port": 0, "worker_engine": "fake", "worker_command": ("/bin/false",)}
    return {
        "queen": create_queen_app(QueenSettings(home=_HOME / "queen")),
        "queen+token": create_queen_app(QueenSettings(home=_HOME / "queen-token", token=TOKEN)),
        "hive": create_hive_app(HiveSettings(**hive)),  # type: ignore[arg-type]
        "hive+token": create_hive_app(HiveSettings(**{**hive, "home": _HOME / "hive-token", "token": TOKEN})),  # type: ignore[arg-type]
        "worker": create_worker_app(FakeEngine(), WorkerSettings()),
        "worker+token": create_worker_app(FakeEngine(), WorkerSettings(token=TOKEN)),
    }


APPS = _apps()


def _operations() -> list[Any]:
    found = []
    for name, app in APPS.items():
        # The schema itself is read with the token; the generated requests carry none.
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Authorization": f"Bearer {TOKEN}"})
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.label not in SKIP:
                found.append(pytest.param(operation, id=f"{name}: {operation.label}"))
    return found


@pytest.fixture(scope="module", autouse=True)
def _lifespans() -> Iterator[None]:
    try:
        yield
    finally:
        shutdown_lifespans()  # the apps' lifespans ran in schemathesis' own event loop thread
        shutil.rmtree(_HOME, ignore_errors=True)


@pytest.mark.parametrize("operation", _operations())
def test_every_answer_is_documented_and_none_is_a_server_error(operation: Any) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        case.call_and_validate(checks=CHECKS)

    check()

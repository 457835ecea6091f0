"""The OpenAPI schemas of the queen, hive and worker, exercised with generated requests.

schemathesis builds requests from each app's own schema (valid and invalid
bodies, paths and query strings) and sends them in process. Every answer must
be documented: never a 500, every error status listed for its endpoint, with
the documented content type and error shape. Each server is tried with and
without a token (without one in the request, every protected endpoint must
answer its documented 401). Bodies are generated valid and invalid (schemathesis'
negative mode); every body-taking endpoint is also sent its body as
``text/plain``, form data and with no content type, which must be the documented
``415``. A stateful run follows the job API's OpenAPI links (create, then read,
stream and cancel the job just created). Examples are bounded so the tier stays
fast.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from rbee.contracts.operations import DEFAULT_MODEL
from rbee.hive.app import HiveSettings, create_hive_app
from rbee.queen.app import QueenSettings, create_queen_app
from rbee.worker.app import WorkerSettings, create_worker_app
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(120)

EXAMPLES = 30
TOKEN = "schema-test-token-0123456789"


@schemathesis.check
def no_undocumented_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """Never a 500; a 502 or 503 only where the operation documents it (a cluster with no
    worker for the model is a documented 503 on the inference routes)."""
    code = response.status_code
    if code >= 500 and (code == 500 or str(code) not in case.operation.responses.status_codes):
        return not_a_server_error(ctx, response, case)
    return None


CHECKS = [no_undocumented_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
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
        "worker": create_worker_app(FakeEngine(model_id=DEFAULT_MODEL), WorkerSettings()),
        "worker+token": create_worker_app(FakeEngine(model_id=DEFAULT_MODEL), WorkerSettings(token=TOKEN)),
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


SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.parametrize("operation", _operations())
def test_every_answer_is_documented_and_none_is_a_server_error(operation: Any) -> None:
    @SETTINGS
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        case.call_and_validate(checks=CHECKS)

    check()


def _body_operations() -> list[Any]:
    return [p for p in _operations() if p.values[0].body]


def _constrained_operations() -> list[Any]:
    """Operations with a body or query parameters: what can be sent invalid."""
    return [p for p in _operations() if p.values[0].body or p.values[0].query]


@pytest.mark.parametrize("operation", _constrained_operations())
def test_invalid_input_is_a_documented_4xx(operation: Any) -> None:
    # A fixed seed rather than derandomize: its draws for the token-less heartbeat are all valid
    # bodies (extra fields are allowed), which leaves schemathesis no invalid case to send.
    @settings(SETTINGS, derandomize=False)
    @seed(20261201)
    @given(case=operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    def check(case: Any) -> None:
        case.call_and_validate(checks=CHECKS)

    check()


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
@pytest.mark.parametrize("operation", _body_operations())
def test_a_body_that_is_not_declared_json_is_the_documented_415(operation: Any, content_type: str | None) -> None:
    @settings(SETTINGS, max_examples=5)
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        # The JSON body as it is, under another content type (a browser's "simple" request), or none.
        body = json.dumps(case.body).encode()
        response = case.call(headers={"Content-Type": content_type}, json=None, data=body)
        assert response.status_code in (401, 415), (response.status_code, response.text)
        case.validate_response(response, checks=CHECKS)

    check()


def _schema(name: str) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", APIS[name], headers={"Authorization": f"Bearer {TOKEN}"})


APIS = {name: app for name, app in APPS.items() if not name.endswith("+token")}


@pytest.mark.parametrize("name", sorted(APIS))
def test_links_from_a_created_job_lead_to_documented_answers(name: str) -> None:
    """Create a job, then follow the 201's links: read it, stream it, cancel it, in any order."""
    schema = _schema(name)
    # The declared links only: schemathesis' inference would also guess links (from the job list,
    # and from body fields it takes for references to resources nothing creates), which makes it
    # start from the list instead of from creating a job.
    schema.config.phases.stateful.inference.algorithms = []
    schema.config.phases.stateful.generation.modes = [GenerationMode.POSITIVE]  # invalid input: tested above
    links = schema["/v1/jobs"]["POST"].definition.raw["responses"]["201"]["links"]
    assert set(links) == {"GetJob", "StreamJob", "CancelJob"}
    followed: list[tuple[str, int]] = []

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            followed.append((case.operation.label, response.status_code))
            case.validate_response(response, checks=CHECKS)

    Workflow.run(
        settings=settings(
            max_examples=15,
            stateful_step_count=6,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
    )
    # The links were followed to jobs that exist.
    reached = {label for label, status in followed if status in (200, 202, 409)}
    assert {"GET /v1/jobs/{job_id}", "GET /v1/jobs/{job_id}/stream"} <= reached, followed

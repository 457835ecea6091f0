"""The queen's wiring: its parts are told of every job in one documented order, and nothing imports the app back."""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from rbee.queen.app import QueenSettings, create_queen_app
from rbee.queen.metrics import QueenMetrics
from rbee.queen.placements import Placements
from rbee.queen.scheduler import Scheduler
from rbee.queen.store import JobStore

pytestmark = pytest.mark.timeout(30)

QUEEN = Path(__file__).parents[2] / "src" / "rbee" / "queen"


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    app = create_queen_app(QueenSettings(home=tmp_path))
    async with app.router.lifespan_context(app):
        yield app


async def test_the_history_hears_of_a_job_first_and_the_page_last(app: FastAPI) -> None:
    hooks = app.state.queen.registry.hooks
    assert [type(hook) for hook in hooks] == [JobStore, Scheduler, QueenMetrics, Placements]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_part_of_the_queen_imports_the_app_back() -> None:
    # main.py is the entry point, above the app; every other module sits below it.
    offenders = [
        str(path.relative_to(QUEEN))
        for path in sorted(QUEEN.rglob("*.py"))
        if path.name not in ("app.py", "main.py") and "rbee.queen.app" in _imports(path)
    ]
    assert offenders == []

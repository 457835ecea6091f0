# Common tasks. The virtual environment is .venv (python -m venv .venv && .venv/bin/pip install -e ".[test,bench]").
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: bench bench-plot test lint

# The benchmark suite: every goal, the figure measured, whether it holds (about five minutes).
bench:
	$(PYTHON) -m bench

# Redraw docs/bench-*.png from bench/results/*.json.
bench-plot:
	$(PYTHON) -m bench.plot

test:
	$(PYTHON) -m pytest tests/unit tests/integration -q

lint:
	$(PYTHON) -m ruff check src tests bench
	$(PYTHON) -m ruff format --check src tests bench

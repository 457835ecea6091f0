"""Benchmarks of rbee, each runnable as ``python -m bench.<name>``; results go to ``bench/results/``."""

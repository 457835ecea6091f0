"""Benchmarks of rbee: ``python -m bench`` runs the suite, each also runnable as ``python -m bench.<name>``.

Results go to ``bench/results/`` (git-ignored); ``docs/benchmarks.md`` reports them.
"""

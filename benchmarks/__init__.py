"""Benchmarks: ``python -m benchmarks.run`` (see README.md and docs/performance.rst)."""

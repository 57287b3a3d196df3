"""Benchmarks of rrcm-jax: each `python -m benchmarks.<name>` prints one table and
writes benchmarks/results/<name>.json.

Shared by all of them: `benchmarks.timing` (best-of-several and interleaved
timers, efficiency against the measured matmul rate) and `benchmarks.report`
(the machine description written beside every figure, tables, JSON output).
"""

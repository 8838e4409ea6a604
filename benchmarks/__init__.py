"""Benchmarks, one script per op (run from the repo root: ``python -m benchmarks.bench_<op>``)."""

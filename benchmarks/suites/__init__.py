"""Benchmark suites run by benchmarks/run.py: kernels, e2e (multi-tenant generation), train."""

"""Benchmarks of iapt_fast. The one entry point is ``python benchmarks/run.py``."""

"""Triton kernels of iapt_fast, installed as ``iapt_fast.kernels`` (see setup.py)."""

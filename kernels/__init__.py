"""Triton kernels of iapt_fast, installed as ``iapt_fast.kernels`` (see setup.py).

``triton_prompt_generator`` is the fused generator (forward and backward) that
``iapt_fast.functional.prompt_generator(..., backend="triton")`` dispatches to.
"""
from .autograd import PromptGeneratorFunction, triton_prompt_generator
from .launch import LaunchSpec, poison_buffers, record_launches

__all__ = ["triton_prompt_generator", "PromptGeneratorFunction", "record_launches", "poison_buffers", "LaunchSpec"]

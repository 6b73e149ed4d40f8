"""vLLM plugin entry point (``vllm.general_plugins``): registers the IAPT model classes.

vLLM calls :func:`register` in every process it starts (front end, engine core, workers). The
class is named by its import path, so nothing heavy is imported until a served model uses it.
"""
from __future__ import annotations

from iapt_fast.serve.adapters import SERVED_FAMILIES

__all__ = ["register"]


def register() -> None:
    """Register every served IAPT architecture with ``vllm.ModelRegistry``."""
    from vllm import ModelRegistry

    for architecture in SERVED_FAMILIES.values():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, f"iapt_fast.serve.vllm_model:{architecture}")

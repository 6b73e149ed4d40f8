"""Per-family knowledge of Hugging Face causal LMs: one small class per family behind the
common interface of :class:`Architecture`, registered by ``config.model_type``.

Adding a family is one new file here: subclass Architecture (or a close relative such as
LlamaLike), decorate it with ``@register("<model_type>")``, import it below, and add the family
to the slow-reference tests.
"""
from iapt_fast.model.architectures.base import FAMILIES, Architecture, get_architecture, register
from iapt_fast.model.architectures import llama  # noqa: E402,F401,I001  (registers the families; llama-like first in listings)
from iapt_fast.model.architectures import gpt2  # noqa: E402,F401

SUPPORTED_FAMILIES = tuple(FAMILIES)

__all__ = ["Architecture", "FAMILIES", "SUPPORTED_FAMILIES", "get_architecture", "register"]

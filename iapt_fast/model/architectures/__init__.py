"""Per-family knowledge of Hugging Face causal LMs: one small class per family behind the
common interface of :class:`Architecture`, found by ``config.model_type`` in ``FAMILIES``.

Adding a family is one new file here: subclass Architecture (or a close relative such as
LlamaLike), add its ``model_type`` to ``FAMILIES`` below, and add the family to the
slow-reference tests.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from torch import nn

from iapt_fast.model.architectures.base import Architecture
from iapt_fast.model.architectures.gpt2 import GPT2
from iapt_fast.model.architectures.llama import LlamaLike, Mistral

# model_type → its Architecture subclass (read-only; llama-like first in listings)
FAMILIES: Mapping[str, type[Architecture]] = MappingProxyType(
    {"llama": LlamaLike, "qwen2": LlamaLike, "qwen3": LlamaLike, "mistral": Mistral, "gpt2": GPT2})
SUPPORTED_FAMILIES = tuple(FAMILIES)

__all__ = ["Architecture", "FAMILIES", "SUPPORTED_FAMILIES", "get_architecture"]


def get_architecture(model: nn.Module) -> Architecture:
    """Recognise a transformers causal LM and return its family's accessors.

    Raises:
        TypeError: ``model`` is not a module with a transformers config.
        ValueError: the family is not supported (the message names the supported ones).
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers causal LM (nn.Module with .config), got {type(model).__name__}")
    family = getattr(model.config, "model_type", None)
    cls = FAMILIES.get(family)
    if cls is None:
        raise ValueError(f"unsupported model family {family!r} ({type(model).__name__}); IAPT supports {list(FAMILIES)}")
    decoder, layers = cls.locate(model)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{type(model).__name__} does not look like a {family} causal LM with a language-model head "
            "(pass the *ForCausalLM / *LMHeadModel, not the bare decoder)"
        )
    if getattr(model.config, "add_cross_attention", False):
        raise ValueError("IAPT supports decoder-only models; this model has cross-attention layers")
    return cls(family=family, model=model, decoder=decoder, layers=layers,
               hidden_size=int(model.config.hidden_size), num_layers=len(layers))

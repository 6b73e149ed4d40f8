"""Per-family knowledge of Hugging Face causal LMs: where the soft tokens enter a layer.

One small class per family behind the common interface of :class:`Architecture`, found by
``config.model_type`` in ``FAMILIES``: it says where the decoder layers are, which module is a
layer's input norm and attention, its key/value shape, and how to turn the soft tokens
P_l [B, T, d] of layer l into that layer's prefix keys and values (design.md §1). The vLLM host
(iapt_fast/serve/) asks the same classes.

Adding a family: subclass Architecture (or a close relative such as LlamaLike) here, add its
``model_type`` to ``FAMILIES`` at the end, and add the family to the slow-reference tests.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

__all__ = ["Architecture", "FAMILIES", "SUPPORTED_FAMILIES", "get_architecture"]


@dataclass
class Architecture:
    """Accessors for one wrapped model; subclasses implement the family-specific methods.

    Attributes:
        family: ``config.model_type``.
        decoder: the module holding the decoder layers (LlamaModel, GPT2Model, ...).
        layers: the decoder layers, in order.
        hidden_size, num_layers: of the backbone.
    """

    family: str
    model: nn.Module
    decoder: nn.Module
    layers: nn.ModuleList
    hidden_size: int
    num_layers: int

    # Where a family keeps its modules: the causal LM's decoder attribute, the decoder's layer
    # list, and each layer's input norm and attention.
    decoder_name: ClassVar[str]
    layers_name: ClassVar[str]
    norm_name: ClassVar[str]
    attention_name: ClassVar[str]
    # Sliding-window attention verified against literal prepending for this family.
    sliding_window_verified: ClassVar[bool] = False

    # ------------------------------------------------------------------ the modules, by name
    @classmethod
    def locate(cls, model: nn.Module) -> tuple[nn.Module | None, nn.ModuleList | None]:
        """(decoder module, decoder layers) of a causal LM of this family (None where absent)."""
        decoder = getattr(model, cls.decoder_name, None)
        return decoder, getattr(decoder, cls.layers_name, None)

    @classmethod
    def input_norm(cls, layer: nn.Module) -> nn.Module:
        """The layer's own input norm (applied to H_l before attention; the generators pool its
        output). The soft tokens enter a layer as its input at positions −T…−1: this norm, then
        the layer's own key/value projections (:meth:`prefix_kv` here; vLLM's layers compute them
        from placeholder rows, iapt_fast/serve/injection.py). vLLM's decoder layers of the served
        families name their modules as transformers' do, so the serving host asks this method too."""
        return getattr(layer, cls.norm_name)

    @classmethod
    def attention(cls, layer: nn.Module) -> nn.Module:
        return getattr(layer, cls.attention_name)

    # ------------------------------------------------------------------ what a family implements
    def kv_shape(self, layer: nn.Module) -> tuple[int, int]:
        """(number of key/value heads, head dim) of ``layer``'s attention."""
        raise NotImplementedError

    def rotary(self, reference: Tensor, num_tokens: int) -> tuple[Tensor, Tensor] | None:
        """cos/sin of the positions −T…−1, or None for families without rotary embeddings.

        Args:
            reference: any tensor with the model's activation dtype and device.
        """
        return None

    def prefix_kv(self, layer: nn.Module, soft: Tensor, rotary: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Prefix keys and values of ``layer`` for the soft tokens ``soft``.

        Args:
            soft: [B, T, d] soft tokens P_l in the model's activation dtype.
            rotary: what ``rotary`` returned for T (shared by every layer of one forward).
        Returns:
            (keys, values), each [B, kv_heads, T, head_dim], exactly what the layer's attention
            would have put into its KV cache had the soft tokens been real inputs at −T…−1.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ per-layer modules
    def layer_device(self, index: int) -> torch.device:
        """Device of decoder layer ``index`` (layers may be spread over devices)."""
        return next(self.layers[index].parameters()).device

    def activation_dtype(self) -> torch.dtype:
        """The dtype of the backbone's activations (its first floating parameter's)."""
        for param in self.model.parameters():
            if param.dtype.is_floating_point:
                return param.dtype
        return torch.float32

    def sliding_window(self) -> int | None:
        """The attention window of the model's sliding-window layers, or None if it has none."""
        config = self.model.config
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
            return None
        return int(window)

    def check_prefix_support(self, num_tokens: int, hides_prefix: bool, length: int | None = None) -> None:
        """Refuse prefix setups whose results would silently differ from literal prepending.

        A sliding-window cache keeps only the last W − 1 entries: once T + ``length`` tokens
        exceed that, the T leading slots are real tokens, so layers that must hide the prefix
        (``hides_prefix``: layers outside ``target_layers``, or a batch of base rows only)
        would hide real keys instead; and a window of at most T tokens cannot hold the prefix
        at all. Families whose sliding window is not verified against literal prepending
        (``sliding_window_verified``) are refused.

        Args:
            length: real tokens the cache will hold (prompt + new tokens); None: unknown yet
                (when an adapter is added), checked again at every call.
        """
        window = self.sliding_window()
        if window is None:
            return
        if not self.sliding_window_verified:
            raise ValueError(f"{self.family} with sliding-window attention (sliding_window={window}) is not "
                             "supported by IAPT yet; use a config without sliding-window layers")
        if window <= num_tokens:
            raise ValueError(f"sliding_window={window} must exceed num_soft_tokens={num_tokens}: the soft tokens "
                             "take T slots of every layer's attention window")
        if hides_prefix and length is not None and num_tokens + length > window - 1:
            raise ValueError(f"a sequence of {length} tokens plus T={num_tokens} prefix slots overflows the "
                             f"sliding window ({window}) of this model, and layers outside target_layers (or "
                             "rows without an adapter) cannot hide the prefix once the window rolls over: use "
                             "target_layers=None, or at most "
                             f"{window - 1 - num_tokens} tokens (prompt + max_new_tokens)")

    def reentrant_checkpointing(self) -> bool:
        """True when some decoder layer would run under reentrant activation checkpointing.

        Reentrant checkpointing passes gradients only through a layer's positional tensors;
        the prefix keys/values reach the attention as keyword arguments, so their graph would
        be replayed twice ("backward through the graph a second time").
        """
        for layer in self.layers:
            if not getattr(layer, "gradient_checkpointing", False):
                continue
            func = getattr(layer, "_gradient_checkpointing_func", None)
            keywords = getattr(func, "keywords", None) or {}
            # torch.utils.checkpoint treats an unspecified use_reentrant as True.
            if keywords.get("use_reentrant", True) is not False:
                return True
        return False


# ---------------------------------------------------------------------- llama, mistral, qwen2, qwen3
# qwen3 adds a per-head k-norm.
class LlamaLike(Architecture):
    """``model.model.layers``; pre-norm ``input_layernorm``; ``self_attn`` with k/v projections
    (grouped-query heads) and a rotary embedding at the decoder level."""

    decoder_name, layers_name, norm_name, attention_name = "model", "layers", "input_layernorm", "self_attn"

    def kv_shape(self, layer: nn.Module) -> tuple[int, int]:
        attn = self.attention(layer)
        return attn.k_proj.out_features // attn.head_dim, attn.head_dim

    def rotary(self, reference: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
        positions = torch.arange(-num_tokens, 0, device=reference.device)[None]
        return self.decoder.rotary_emb(reference, positions)

    def prefix_kv(self, layer: nn.Module, soft: Tensor, rotary: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        batch, num_tokens, _ = soft.shape
        normed = self.input_norm(layer)(soft)
        attn = self.attention(layer)
        shape = (batch, num_tokens, -1, attn.head_dim)
        key = attn.k_proj(normed).view(shape)
        k_norm = getattr(attn, "k_norm", None)
        if k_norm is not None:  # qwen3: RMSNorm over each head before the rotary embedding
            key = k_norm(key)
        key = key.transpose(1, 2)
        value = attn.v_proj(normed).view(shape).transpose(1, 2)
        cos, sin = rotary
        if cos.device != key.device:
            cos, sin = cos.to(key.device), sin.to(key.device)
        # The family's own apply_rotary_pos_emb, so partial-rotary or interleaved variants of a
        # family stay right; it rotates (q, k) and we only need k.
        apply = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        _, key = apply(key, key, cos, sin)
        return key, value


class Mistral(LlamaLike):
    """Llama-like; its sliding window is verified against literal prepending (the soft tokens
    leave the window like real prepended tokens)."""

    sliding_window_verified = True


# ---------------------------------------------------------------------- gpt2
class GPT2(Architecture):
    """``model.transformer.h``; a fused ``c_attn`` projection; learned absolute positions, so the
    prefix gets no rotary embedding (its positions live in the input embeddings only)."""

    decoder_name, layers_name, norm_name, attention_name = "transformer", "h", "ln_1", "attn"

    def kv_shape(self, layer: nn.Module) -> tuple[int, int]:
        attn = self.attention(layer)
        return attn.num_heads, attn.head_dim

    def prefix_kv(self, layer: nn.Module, soft: Tensor, rotary=None) -> tuple[Tensor, Tensor]:
        batch, num_tokens, _ = soft.shape
        attn = self.attention(layer)
        _, key, value = attn.c_attn(self.input_norm(layer)(soft)).split(attn.split_size, dim=2)
        shape = (batch, num_tokens, -1, attn.head_dim)
        return key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2)


# model_type → its Architecture subclass (read-only; llama-like first in listings)
FAMILIES: Mapping[str, type[Architecture]] = MappingProxyType(
    {"llama": LlamaLike, "qwen2": LlamaLike, "qwen3": LlamaLike, "mistral": Mistral, "gpt2": GPT2})
SUPPORTED_FAMILIES = tuple(FAMILIES)


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

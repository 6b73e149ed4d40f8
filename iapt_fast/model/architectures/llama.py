"""Llama-like families: llama, mistral, qwen2, qwen3 (qwen3 adds a per-head k-norm)."""
from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from iapt_fast.model.architectures.base import Architecture


class LlamaLike(Architecture):
    """``model.model.layers``; pre-norm ``input_layernorm``; ``self_attn`` with k/v projections
    (grouped-query heads) and a rotary embedding at the decoder level."""

    @classmethod
    def locate(cls, model: nn.Module):
        decoder = getattr(model, "model", None)
        return decoder, getattr(decoder, "layers", None)

    @staticmethod
    def input_norm(layer: nn.Module) -> nn.Module:
        return layer.input_layernorm

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def kv_shape(self, layer: nn.Module) -> tuple[int, int]:
        attn = layer.self_attn
        return attn.k_proj.out_features // attn.head_dim, attn.head_dim

    def rotary(self, reference: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
        positions = torch.arange(-num_tokens, 0, device=reference.device)[None]
        return self.decoder.rotary_emb(reference, positions)

    def prefix_kv(self, layer: nn.Module, soft: Tensor, rotary: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        batch, num_tokens, _ = soft.shape
        normed = layer.input_layernorm(soft)
        attn = layer.self_attn
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

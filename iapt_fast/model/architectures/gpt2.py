"""GPT-2: ``model.transformer.h``; a fused ``c_attn`` projection; learned absolute positions,
so the prefix gets no rotary embedding (its positions live in the input embeddings only)."""
from __future__ import annotations

from torch import Tensor, nn

from iapt_fast.model.architectures.base import Architecture


class GPT2(Architecture):

    @classmethod
    def locate(cls, model: nn.Module):
        decoder = getattr(model, "transformer", None)
        return decoder, getattr(decoder, "h", None)

    @staticmethod
    def input_norm(layer: nn.Module) -> nn.Module:
        return layer.ln_1

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn

    def kv_shape(self, layer: nn.Module) -> tuple[int, int]:
        return layer.attn.num_heads, layer.attn.head_dim

    def prefix_kv(self, layer: nn.Module, soft: Tensor, rotary=None) -> tuple[Tensor, Tensor]:
        batch, num_tokens, _ = soft.shape
        attn = layer.attn
        _, key, value = attn.c_attn(layer.ln_1(soft)).split(attn.split_size, dim=2)
        shape = (batch, num_tokens, -1, attn.head_dim)
        return key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2)

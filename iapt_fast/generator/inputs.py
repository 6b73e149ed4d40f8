"""Random generator inputs at any size: one builder for the offline compile check, the
benchmark suite and the GPU check (the tests' oracle problems, with their float64 masters and
controlled logit scales, live in tests/kernels_cases.py).

The scales keep every stage O(1): W_down ~ d^-1/2, W_pool and W_up ~ m^-1/2, rational
coefficients ~ 0.3, so timings and compiled variants see realistic, finite values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GeneratorInputs", "random_inputs"]


@dataclass
class GeneratorInputs:
    """hidden [B, N, d], mask [B, N] bool, weights {name: [A, ...]} (the keyword arguments of
    ``prompt_generator``, anchor and anchor_scale included when anchored), adapter_ids [B] or None."""

    hidden: Tensor
    mask: Tensor
    weights: dict[str, Tensor]
    adapter_ids: Tensor | None

    @property
    def used_adapters(self) -> int:
        return 1 if self.adapter_ids is None else int(torch.unique(self.adapter_ids).numel())


def random_inputs(batch: int, seq: int, dim: int, bottleneck: int, tokens: int, adapters: int = 1,
                  degrees: tuple[int, int] = (6, 5), *, dtype: torch.dtype = torch.float32,
                  weight_dtype: torch.dtype | None = None, device: str | torch.device = "cpu", seed: int = 0,
                  min_fill: float = 1.0, anchored: bool = False, requires_grad: bool = False) -> GeneratorInputs:
    """Random inputs of one generator call.

    Args:
        min_fill: each row keeps a random number of its first tokens in [min_fill·N, N] as
            instruction (1.0: every token).
        anchored: add anchor [A, T, d] and anchor_scale [A] (the anchored form).
        requires_grad: make hidden and every weight but anchor_scale leaves that need gradients.
    Adapter ids cycle through the adapters (every adapter used when B >= A).
    """
    gen = torch.Generator().manual_seed(seed)
    wdt = weight_dtype or dtype

    def rnd(*shape: int, scale: float = 1.0, as_dtype: torch.dtype = wdt) -> Tensor:
        out = (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=as_dtype)
        return out.requires_grad_(requires_grad)

    hidden = rnd(batch, seq, dim, as_dtype=dtype)
    lengths = torch.randint(max(1, int(seq * min_fill)), seq + 1, (batch,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(device)
    p, q = degrees
    weights = {
        "w_down": rnd(adapters, dim, bottleneck, scale=dim**-0.5),
        "w_pool": rnd(adapters, bottleneck, tokens, scale=bottleneck**-0.5),
        "rat_num": rnd(adapters, p + 1, scale=0.3),
        "rat_den": rnd(adapters, q, scale=0.3),
        "w_up": rnd(adapters, bottleneck, dim, scale=bottleneck**-0.5),
    }
    if anchored:
        weights["anchor"] = rnd(adapters, tokens, dim)
        weights["anchor_scale"] = (0.5 + torch.rand(adapters, generator=gen)).to(device=device, dtype=wdt)
    ids = (torch.arange(batch) % adapters).to(device) if adapters > 1 else None
    return GeneratorInputs(hidden, mask, weights, ids)

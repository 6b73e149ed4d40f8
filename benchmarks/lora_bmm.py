"""A gathered-BMM multi-LoRA (Punica-style BGMV in plain PyTorch), written for the benchmark.

Every row of a batch gets its own adapter: the adapters' A and B matrices are stacked
([K, in, r] and [K, r, out]) and gathered by a per-row index, so a mixed batch costs two
batched matmuls per adapted linear layer, not one loop iteration per tenant (which is what
PEFT's ``adapter_names=`` does). Punica's BGMV kernel gathers inside the kernel; in PyTorch
the gather materialises each row's weights, the honest cost of doing it without a custom
kernel. When a batch uses one adapter only, the gather is skipped (plain matmuls).

Usage:
    handle = attach_gathered_lora(model, ["q_proj", "v_proj"], num_adapters=8, rank=16)
    handle.set_adapter_ids(torch.tensor([0, 3, 5, ...]))   # one id per row
    model.generate(...)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["GatheredLoRALinear", "GatheredLoRA", "attach_gathered_lora"]


class _Ids:
    """The per-row adapter ids shared by every adapted layer of one model."""

    def __init__(self) -> None:
        self.ids: Tensor | None = None
        self.single: int | None = None


class GatheredLoRALinear(nn.Module):
    """y = base(x) + scale · (x · A[ids[b]]) · B[ids[b]] for every row b.

    Args:
        base: the frozen nn.Linear (in_features → out_features).
        num_adapters: K stacked adapters.
        rank: r.
        alpha: LoRA alpha; scale = alpha / r.
    Shapes: x [B, S, in] → [B, S, out]; lora_a [K, in, r]; lora_b [K, r, out].
    """

    def __init__(self, base: nn.Linear, num_adapters: int, rank: int, alpha: float, ids: _Ids,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if num_adapters < 1 or rank < 1:
            raise ValueError(f"num_adapters and rank must be >= 1, got {num_adapters} and {rank}")
        self.base = base
        self.scale = alpha / rank
        self._ids = ids
        w = base.weight
        a = torch.randn(num_adapters, base.in_features, rank, generator=generator) / math.sqrt(base.in_features)
        # B random (not PEFT's zeros) so the adapters really change the output.
        b = torch.randn(num_adapters, rank, base.out_features, generator=generator) * 0.02
        self.lora_a = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(b.to(device=w.device, dtype=w.dtype))

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self._ids.ids is None:
            raise RuntimeError("GatheredLoRA: call set_adapter_ids(ids) before running the model")
        if self._ids.single is not None:
            k = self._ids.single
            delta = (x @ self.lora_a[k]) @ self.lora_b[k]
        else:
            ids = self._ids.ids
            if x.shape[0] != ids.shape[0]:
                raise RuntimeError(f"GatheredLoRA: batch has {x.shape[0]} rows but {ids.shape[0]} adapter ids are set")
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            delta = torch.bmm(torch.bmm(flat, self.lora_a[ids]), self.lora_b[ids]).reshape(*x.shape[:-1], -1)
        return out + self.scale * delta


@dataclass
class GatheredLoRA:
    """Handle of the adapted layers of one model."""

    layers: dict[str, GatheredLoRALinear] = field(default_factory=dict)
    ids: _Ids = field(default_factory=_Ids)
    num_adapters: int = 0
    rank: int = 0

    def set_adapter_ids(self, ids: Tensor) -> None:
        """Row b of the next batches uses adapter ids[b] (int64 in [0, K))."""
        if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be a 1-D integer tensor, got {tuple(ids.shape)} {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.num_adapters:
            raise ValueError(f"ids must lie in [0, {self.num_adapters}), got [{lo}, {hi}]")
        self.ids.ids = ids.long()
        self.ids.single = lo if lo == hi else None

    def trainable_parameters(self) -> int:
        return sum(p.numel() for layer in self.layers.values() for p in (layer.lora_a, layer.lora_b))

    def adapter(self, name: str, index: int) -> tuple[Tensor, Tensor]:
        """(A [in, r], B [r, out]) of adapter ``index`` at layer ``name``."""
        layer = self.layers[name]
        return layer.lora_a[index], layer.lora_b[index]


def attach_gathered_lora(model: nn.Module, target_modules: list[str], num_adapters: int, rank: int,
                         alpha: float | None = None, seed: int = 0) -> GatheredLoRA:
    """Replace every nn.Linear whose name ends with one of ``target_modules`` in place.

    Returns the handle; raises ValueError when no module matches.
    """
    gen = torch.Generator().manual_seed(seed)
    handle = GatheredLoRA(num_adapters=num_adapters, rank=rank)
    alpha = float(2 * rank if alpha is None else alpha)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and name.split(".")[-1] in target_modules]
    if not targets:
        raise ValueError(f"no nn.Linear named {target_modules} in {type(model).__name__}")
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = GatheredLoRALinear(mod, num_adapters, rank, alpha, handle.ids, gen)
        setattr(parent, child, layer)
        handle.layers[name] = layer
    return handle

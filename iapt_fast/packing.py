"""Serving packs: the generators of many adapters stacked once, for gathered launches.

A mixed batch gathers each row's adapter out of an [A, ...] stack (design.md §3). Stacking the
adapters a batch uses at every prefill would copy A·(2·d·m + …) floats per layer per request
(gigabytes for 64 adapters on a 7B model), so serving keeps one stack per *group* of
adapters with identical generator shapes, built once.

The stack is the only copy: after packing, every adapter's Parameters are re-pointed to be
views of their slot (``param.data = stack[slot]``). Training an adapter in place (any
torch optimiser) therefore updates what serving reads, with no invalidation, and 1,000
adapters cost their own size once. Adding or deleting an adapter, or moving the model
(``.to()``), invalidates the packs; the next no-grad forward rebuilds them (O(total size),
once).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .generator import GeneratorBank

__all__ = ["AdapterPack", "group_key", "build_packs"]


def group_key(bank: GeneratorBank, name: str) -> tuple:
    """Adapters with equal keys share one stack and one generator launch per layer.

    The key holds everything one ``prompt_generator`` call must agree on: the target layers,
    T, m, rational degrees and version, the pooling input, the generator form (its tensor
    names) and the dtype and device of every tensor. Equal keys are what makes stacking
    lossless: ``torch.stack`` never has to promote a dtype, so packing cannot change any
    adapter's values or dtypes.
    """
    adapter = bank[name]
    cfg = adapter.config
    first = adapter[adapter.layer_indices[0]]
    return (
        tuple(adapter.layer_indices),
        cfg.num_soft_tokens,
        first.w_down.shape[1],
        tuple(cfg.rational_degrees),
        cfg.rational_version,
        cfg.pool_input,
        first.names,
        tuple(sorted({(str(t.dtype), str(t.device)) for gen in adapter.layers.values() for t in gen.weights().values()})),
        first.w_down.device,
    )


@dataclass
class AdapterPack:
    """One group of same-shape adapters, stacked.

    Attributes:
        names: adapter names; ``index[name]`` is the adapter's slot (its id in launches).
        weights: ``weights[layer][w]`` is the [A, ...] stack of weight ``w`` (design.md §3 layout).
    """

    key: tuple
    names: list[str]
    index: dict[str, int] = field(default_factory=dict)
    weights: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    probe: tuple[Tensor, int] | None = None

    def is_live(self) -> bool:
        """False once the Parameters no longer alias the stack (e.g. after ``.to()``)."""
        if self.probe is None:
            return False
        param, ptr = self.probe
        return param.data_ptr() == ptr


@torch.inference_mode(False)  # a pack built under inference_mode would poison later training
@torch.no_grad()
def build_packs(bank: GeneratorBank) -> dict[tuple, AdapterPack]:
    """Stack every adapter of ``bank`` into per-group packs and alias its Parameters to them."""
    groups: dict[tuple, list[str]] = {}
    for name in bank.adapter_names:
        groups.setdefault(group_key(bank, name), []).append(name)
    packs: dict[tuple, AdapterPack] = {}
    for key, names in groups.items():
        pack = AdapterPack(key=key, names=names, index={n: i for i, n in enumerate(names)})
        for layer in key[0]:
            gens = [bank[n][layer] for n in names]
            names_here = gens[0].names
            stacked = {w: torch.stack([getattr(g, w).data for g in gens]) for w in names_here}
            for w, stack in stacked.items():  # the invariant the key guarantees; never re-point on a change
                if any(getattr(g, w).dtype != stack.dtype for g in gens):
                    raise RuntimeError(f"packing would change the dtype of {w} at layer {layer} of {names}")
            for slot, gen in enumerate(gens):
                for w in names_here:
                    getattr(gen, w).data = stacked[w][slot]
            pack.weights[layer] = stacked
        first = bank[names[0]][key[0][0]].w_down
        pack.probe = (first, first.data_ptr())
        packs[key] = pack
    return packs

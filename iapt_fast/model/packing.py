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

import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from iapt_fast.generator.bank import GeneratorBank

__all__ = ["AdapterPack", "GroupKey", "ServingPacks", "group_key", "build_packs"]


class GroupKey(NamedTuple):
    """Adapters with equal keys share one stack and one generator launch per layer: everything
    one ``prompt_generator`` call must agree on. Equal ``dtypes`` make stacking lossless:
    ``torch.stack`` never has to promote, so packing cannot change any adapter's values."""

    layers: tuple[int, ...]
    num_soft_tokens: int
    bottleneck: int
    rational_degrees: tuple[int, int]
    rational_version: str
    pool_input: str
    tensor_names: tuple[str, ...]
    dtypes: tuple[tuple[str, str], ...]  # (dtype, device) of every tensor, sorted
    device: torch.device


def group_key(bank: GeneratorBank, name: str) -> GroupKey:
    """The shape group of adapter ``name``."""
    adapter = bank[name]
    cfg = adapter.config
    first = adapter[adapter.layer_indices[0]]
    return GroupKey(
        layers=tuple(adapter.layer_indices),
        num_soft_tokens=cfg.num_soft_tokens,
        bottleneck=first.w_down.shape[1],
        rational_degrees=tuple(cfg.rational_degrees),
        rational_version=cfg.rational_version,
        pool_input=cfg.pool_input,
        tensor_names=tuple(first.names),
        dtypes=tuple(sorted({(str(t.dtype), str(t.device)) for gen in adapter.layers.values()
                             for t in gen.weights().values()})),
        device=first.w_down.device,
    )


@dataclass
class AdapterPack:
    """One group of same-shape adapters, stacked.

    Attributes:
        names: adapter names; ``index[name]`` is the adapter's slot (its id in launches).
        weights: ``weights[layer][w]`` is the [A, ...] stack of weight ``w`` (design.md §3 layout).
    """

    key: GroupKey
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
def build_packs(bank: GeneratorBank) -> dict[GroupKey, AdapterPack]:
    """Stack every adapter of ``bank`` into per-group packs and alias its Parameters to them."""
    groups: dict[GroupKey, list[str]] = {}
    for name in bank.adapter_names:
        groups.setdefault(group_key(bank, name), []).append(name)
    packs: dict[GroupKey, AdapterPack] = {}
    for key, names in groups.items():
        pack = AdapterPack(key=key, names=names, index={n: i for i, n in enumerate(names)})
        for layer in key.layers:
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
        first = bank[names[0]][key.layers[0]].w_down
        pack.probe = (first, first.data_ptr())
        packs[key] = pack
    return packs


class ServingPacks:
    """The packs of one GeneratorBank, owned by the model that serves it.

    The one place where parameter storage changes: :meth:`current` (re)builds the packs, which
    re-points every adapter's Parameters into the stacks (see the module docstring), when none
    exist or they no longer alias the parameters. :meth:`invalidate` is called whenever the
    set of adapters changes or the model moves (``.to()``); the group keys are cached here too.
    """

    def __init__(self, bank: GeneratorBank) -> None:
        self.bank = bank
        self._packs: dict[GroupKey, AdapterPack] | None = None
        self._keys: dict[str, GroupKey] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # deepcopy / pickle: the lock stays behind, packs rebuild
        return {"bank": self.bank}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["bank"])

    def invalidate(self) -> None:
        self._packs = None
        self._keys = {}

    def key(self, name: str) -> GroupKey:
        """``group_key`` of adapter ``name``, computed once per change of the adapters."""
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = group_key(self.bank, name)
        return key

    def current(self) -> dict[GroupKey, AdapterPack]:
        packs = self._packs
        if packs is None or not all(p.is_live() for p in packs.values()):
            with self._lock:  # concurrent first calls must not re-point the parameters twice
                packs = self._packs
                if packs is None or not all(p.is_live() for p in packs.values()):
                    packs = self._packs = build_packs(self.bank)
        return packs


"""Serving packs: the generators of many adapters stacked once, for gathered launches.

A mixed batch gathers each row's adapter out of an [A, ...] stack (design.md §3). Stacking the
adapters a batch uses at every prefill would copy A·(2·d·m + …) floats per layer per request
(gigabytes for 64 adapters on a 7B model), so serving keeps one stack per *group* of
adapters with identical generator shapes, built once.

The stack is the only copy: after packing, every adapter's Parameters are re-pointed to be
views of their slot (``param.data = stack[slot]``). Training an adapter in place (any
torch optimiser) therefore updates what serving reads, with no invalidation, and 1,000
adapters cost their own size once. Whatever else changes an adapter's storage (a dtype or
device move of the model, the bank, one adapter or one layer; ``param.data = ...``; a replaced
Parameter or buffer) breaks the aliasing, which every serving call checks for the adapters it
uses (O(their tensor count), no copy); the packs are then rebuilt (O(total size), once), so
no call is ever served a stale stack or a stale group key.

Each pack also caches the per-adapter products W_down·W_pool the one-launch inference forward
streams against (:meth:`AdapterPack.weight_products`), keyed by the version counters of the
stacks and of every slot's w_down / w_pool: an in-place update through an adapter's parameter
or through the stack bumps one of them and the product is recomputed on the next call; a dtype
or device move rebuilds the pack, and with it the cache.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from iapt_fast.generator import functional
from iapt_fast.generator.bank import AdapterGenerators, GeneratorBank
from iapt_fast.generator.limits import MAX_SOFT_TOKENS

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


def group_key(adapter: AdapterGenerators) -> GroupKey:
    """The shape group of ``adapter``, from its tensors as they are now."""
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
        members: the adapter objects, in slot order.
        aliases: per slot, (module, tensor name, tensor, data_ptr) of every tensor re-pointed
            into the stack: what :meth:`holds` checks.
        product_sources: per layer, the stacks and slot tensors of w_down and w_pool, whose
            version counters key the cached products.
    """

    key: GroupKey
    names: list[str]
    index: dict[str, int] = field(default_factory=dict)
    weights: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    members: list[AdapterGenerators] = field(default_factory=list)
    aliases: list[tuple[tuple[nn.Module, str, Tensor, int], ...]] = field(default_factory=list)
    product_sources: dict[int, tuple[Tensor, ...]] = field(default_factory=dict)
    _products: dict[int, tuple[tuple[int, ...], Tensor]] = field(default_factory=dict, repr=False)

    def weight_products(self, layer: int) -> Tensor:
        """W_dp [A, d, 16] float32 = W_down[a]·W_pool[a] of ``layer`` (columns >= T zero), computed
        once per weights version (see the module docstring): never stale, never recomputed for
        an unchanged pack. Needs T <= 16 (the Triton backend's limit)."""
        sources = self.product_sources[layer]
        version = tuple(t._version for t in sources)
        cached = self._products.get(layer)
        if cached is not None and cached[0] == version:
            return cached[1]
        w_down, w_pool = self.weights[layer]["w_down"], self.weights[layer]["w_pool"]
        tokens = w_pool.shape[2]
        if tokens > MAX_SOFT_TOKENS:
            raise ValueError(f"weight_products needs at most {MAX_SOFT_TOKENS} soft tokens; got {tokens}")
        with torch.no_grad():
            product = torch.zeros(w_down.shape[0], w_down.shape[1], MAX_SOFT_TOKENS, dtype=torch.float32,
                                  device=w_down.device)
            # float64: no TF32 rounding whatever the matmul flags; once per weights version.
            product[..., :tokens] = torch.bmm(w_down.double(), w_pool.double()).float()
        self._products[layer] = (version, product)  # one dict store: atomic for concurrent callers
        return product

    def inference_products(self, layer: int, backend: str, device: torch.device) -> Tensor | None:
        """What ``prompt_generator(weight_products=...)`` takes for ``layer``: the cached W_dp when
        the call runs the Triton kernels (their inference forward is then one launch, design.md
        §4), else None (the torch paths form their own products)."""
        if functional.resolve_backend(backend, device) != "triton" or self.key.num_soft_tokens > MAX_SOFT_TOKENS:
            return None
        return self.weight_products(layer)

    def holds(self, slot: int, adapter: AdapterGenerators) -> bool:
        """True while ``adapter`` is the one in ``slot`` and every tensor of it still is the
        view of its slot that packing made. Any ``.to()`` / ``.half()`` of any module holding it
        (the bank, the adapter, one layer), ``param.data = ...``, a replaced Parameter or buffer
        breaks that; in-place updates (optimisers, ``copy_``) keep it, and write into the stack."""
        if self.members[slot] is not adapter:
            return False
        for module, name, tensor, ptr in self.aliases[slot]:
            if getattr(module, name) is not tensor or tensor.data_ptr() != ptr:
                return False
        return True


@torch.inference_mode(False)  # a pack built under inference_mode would poison later training
@torch.no_grad()
def build_packs(adapters: dict[str, AdapterGenerators]) -> dict[GroupKey, AdapterPack]:
    """Stack ``adapters`` (name → adapter) into per-group packs and alias their tensors to them."""
    groups: dict[GroupKey, list[str]] = {}
    for name, adapter in adapters.items():
        groups.setdefault(group_key(adapter), []).append(name)
    packs: dict[GroupKey, AdapterPack] = {}
    for key, names in groups.items():
        members = [adapters[n] for n in names]
        pack = AdapterPack(key=key, names=names, index={n: i for i, n in enumerate(names)}, members=members)
        aliases: list[list[tuple[nn.Module, str, Tensor, int]]] = [[] for _ in names]
        for layer in key.layers:
            sources: list[Tensor] = []
            gens = [a[layer] for a in members]
            names_here = gens[0].names
            stacked = {w: torch.stack([getattr(g, w).data for g in gens]) for w in names_here}
            for w, stack in stacked.items():  # the invariant the key guarantees; never re-point on a change
                if any(getattr(g, w).dtype != stack.dtype for g in gens):
                    raise RuntimeError(f"packing would change the dtype of {w} at layer {layer} of {names}")
            for slot, gen in enumerate(gens):
                for w in names_here:
                    tensor = getattr(gen, w)
                    tensor.data = stacked[w][slot]
                    aliases[slot].append((gen, w, tensor, tensor.data_ptr()))
                    if w in ("w_down", "w_pool"):
                        sources.append(tensor)
            pack.weights[layer] = stacked
            pack.product_sources[layer] = (stacked["w_down"], stacked["w_pool"], *sources)
        pack.aliases = [tuple(a) for a in aliases]
        packs[key] = pack
    return packs


class ServingPacks:
    """The packs of one GeneratorBank, owned by the model that serves it.

    The one place where parameter storage changes: :meth:`locate` (re)builds the packs, which
    re-points every adapter's tensors into the stacks (see the module docstring), when an
    adapter a call uses is in none of them or no longer aliases its slot (:meth:`AdapterPack.holds`).
    What a call is served therefore never depends on anyone having called :meth:`invalidate`
    (called when the set of adapters changes, to free the old stacks early): a dtype or device
    move or a replaced tensor of any adapter a call uses is seen by that call.
    """

    def __init__(self, bank: GeneratorBank) -> None:
        self.bank = bank
        self._where: dict[str, tuple[AdapterPack, int]] = {}  # name → (pack, slot); replaced whole
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # deepcopy / pickle: the lock stays behind, packs rebuild
        return {"bank": self.bank}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["bank"])

    def invalidate(self) -> None:
        self._where = {}

    def locate(self, adapters: dict[str, AdapterGenerators]) -> dict[str, tuple[AdapterPack, int]]:
        """(pack, slot) of each of ``adapters`` (name → the adapter object a call validated),
        building the packs first if one of them is not held by its slot.

        An adapter that is no longer the bank's (deleted, or replaced under its name, while
        the call ran) is left out: the caller serves it from its own tensors.
        """
        found = self._find(self._where, adapters)
        if len(found) == len(adapters):
            return found
        with self._lock:  # concurrent calls must not re-point the parameters twice
            found = self._find(self._where, adapters)
            if len(found) == len(adapters):
                return found
            where = {}
            for pack in build_packs(self.bank.snapshot()).values():
                where.update((n, (pack, slot)) for slot, n in enumerate(pack.names))
            self._where = where
            return self._find(where, adapters)

    @staticmethod
    def _find(where: dict[str, tuple[AdapterPack, int]],
              adapters: dict[str, AdapterGenerators]) -> dict[str, tuple[AdapterPack, int]]:
        found = {}
        for name, adapter in adapters.items():
            place = where.get(name)
            if place is not None and place[0].holds(place[1], adapter):
                found[name] = place
        return found

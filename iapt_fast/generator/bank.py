"""Parameters of the IAPT prompt generators (every target layer × every adapter), and the
serving packs that stack same-shape adapters once for gathered launches.

Each adapter owns its own Parameters (so training one adapter, with weight decay, never
touches another, and adapters can be added or deleted without rebuilding optimiser state of
the others). A forward stacks the adapters a batch uses into the [A, ...] layout of
design.md §3; stacking one adapter is a view, not a copy.

Initialisation (every parameter gets a non-zero gradient on the first backward):
    W_down ~ N(0, 1/d)      X has the scale of H
    W_pool ~ N(0, 1/m)      the pooling starts near uniform but not exactly uniform
    rational                least-squares fit to ``config.rational_init``
    W_up   ~ N(0, init_std_up²)   small, never exactly zero: zero soft tokens give NaN
                                  gradients through RMSNorm
    anchor B  (anchored form)     the backbone's own input hidden states of this layer for an
                                  init sequence of T tokens (computed by the caller, see
                                  iapt_fast.model.anchor); anchor_scale s = RMS(B), a fixed buffer

Serving packs. A mixed batch gathers each row's adapter out of an [A, ...] stack (design.md §3).
Stacking the adapters a batch uses at every prefill would copy A·(2·d·m + …) floats per layer
per request (gigabytes for 64 adapters on a 7B model), so serving keeps one stack per *group* of
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

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple

import torch
from torch import Tensor, nn

from iapt_fast.config import CUSTOM_INIT, IAPTConfig
from iapt_fast.generator import functional
from iapt_fast.generator.limits import MAX_SOFT_TOKENS
from iapt_fast.generator.rational import fit_rational
from iapt_fast.generator.weights import ANCHOR_NAMES, WEIGHT_NAMES  # the names and their order, defined once

__all__ = ["LayerGenerator", "AdapterGenerators", "GeneratorBank", "WEIGHT_NAMES", "ANCHOR_NAMES", "tensor_names",
           "anchor_scale_of", "stack_layers",
           "AdapterPack", "GroupKey", "ServingPacks", "group_key", "build_packs"]


def tensor_names(config: IAPTConfig) -> tuple[str, ...]:
    """Names of the per-layer tensors of an adapter with ``config`` (weights file order)."""
    return WEIGHT_NAMES + ANCHOR_NAMES if config.anchored else WEIGHT_NAMES


def anchor_scale_of(anchor: Tensor, scaled: bool) -> Tensor:
    """s = RMS(anchor) (a 0-dim float32 tensor), or 1 when ``scaled`` is False."""
    if not scaled:
        return torch.ones((), dtype=torch.float32, device=anchor.device)
    return anchor.detach().float().pow(2).mean().sqrt()


class LayerGenerator(nn.Module):
    """The generator of one layer for one adapter.

    Parameters: w_down [d, m], w_pool [m, T], rat_num [p+1], rat_den [q], w_up [m, d], and in
    the anchored form anchor [T, d] (Parameter) and anchor_scale [] (buffer: a fixed scale).
    """

    def __init__(self, hidden_size: int, config: IAPTConfig, rat_num: Tensor, rat_den: Tensor,
                 generator: torch.Generator | None = None, anchor: Tensor | None = None) -> None:
        super().__init__()
        d = hidden_size
        m = config.resolved_bottleneck(hidden_size)
        t = config.num_soft_tokens
        self.w_down = nn.Parameter(torch.randn(d, m, generator=generator) / math.sqrt(d))
        self.w_pool = nn.Parameter(torch.randn(m, t, generator=generator) / math.sqrt(m))
        self.rat_num = nn.Parameter(rat_num.clone().float())
        self.rat_den = nn.Parameter(rat_den.clone().float())
        self.w_up = nn.Parameter(torch.randn(m, d, generator=generator) * config.init_std_up)
        self.names = tensor_names(config)
        if config.anchored:
            if anchor is None or tuple(anchor.shape) != (t, d):
                raise ValueError(f"an anchored generator needs its anchor [T={t}, d={d}] (the backbone's hidden "
                                 f"states of the init sequence), got {None if anchor is None else tuple(anchor.shape)}")
            self.anchor = nn.Parameter(anchor.detach().float().clone())
            # Anchors only: s = 0 switches the generator term off exactly (P = B), whatever W_up holds.
            scale = anchor_scale_of(anchor, config.anchor_scaled)
            self.register_buffer("anchor_scale", torch.zeros_like(scale) if config.anchors_only else scale)

    def weights(self) -> dict[str, Tensor]:
        """This layer's tensors with a leading adapter axis of size 1 (views, no copies):
        WEIGHT_NAMES, plus ANCHOR_NAMES in the anchored form (the keyword arguments of
        ``prompt_generator``)."""
        return {name: getattr(self, name).unsqueeze(0) for name in self.names}

    @property
    def shape_key(self) -> tuple[int, ...]:
        """Adapters whose generators share this key can be stacked into one launch."""
        return (*self.w_down.shape, self.w_pool.shape[1], self.rat_num.numel(), self.rat_den.numel(), self.names)


class AdapterGenerators(nn.Module):
    """All target layers of one adapter: ``layers[str(layer_index)]`` is a LayerGenerator."""

    def __init__(self, config: IAPTConfig, hidden_size: int, num_layers: int, seed: int | None = None,
                 anchors: dict[int, Tensor] | None = None, backbone: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.backbone = backbone  # what the adapter is made on, saved with it (iapt_fast.model.adapter_io)
        self.layer_indices = config.resolved_layers(num_layers)
        init = "identity" if config.rational_init == CUSTOM_INIT else config.rational_init
        num, den, err = fit_rational(init, config.rational_degrees, config.rational_version,
                                     config.rational_fit_interval)
        self.rational_fit_error = err
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        if config.anchored and anchors is None:
            raise ValueError("an anchored adapter needs anchors: {layer: [T, d]} hidden states of its init "
                             "sequence (IAPTModel computes them from the backbone)")
        self.layers = nn.ModuleDict(
            {str(i): LayerGenerator(hidden_size, config, num, den, gen, anchors[i] if anchors else None)
             for i in self.layer_indices}
        )

    @classmethod
    def from_weights(cls, config: IAPTConfig, hidden_size: int, num_layers: int,
                     weights: dict[int, dict[str, Tensor]],
                     backbone: dict[str, Any] | None = None) -> "AdapterGenerators":
        """An adapter holding exactly ``weights`` (layer → tensor_names → per-adapter tensor),
        without paying for a random initialisation or a rational fit (adapter loading).

        The tensors are used as they are (no copy); shapes are the caller's responsibility.
        """
        adapter = cls.__new__(cls)
        nn.Module.__init__(adapter)
        adapter.config = config
        adapter.hidden_size = hidden_size
        adapter.backbone = backbone
        adapter.layer_indices = config.resolved_layers(num_layers)
        adapter.rational_fit_error = float("nan")  # not fitted: the coefficients were loaded
        layers = {}
        for i in adapter.layer_indices:
            gen = LayerGenerator.__new__(LayerGenerator)
            nn.Module.__init__(gen)
            gen.names = tensor_names(config)
            for name in gen.names:
                if name == "anchor_scale":
                    gen.register_buffer(name, weights[i][name])
                else:
                    setattr(gen, name, nn.Parameter(weights[i][name]))
            layers[str(i)] = gen
        adapter.layers = nn.ModuleDict(layers)
        return adapter

    def set_trainable(self, trainable: bool) -> None:
        """Let this adapter's parameters train, or freeze them. An anchors-only adapter trains
        its anchors alone: its generator weights are multiplied by s = 0 and stay as built."""
        for name, param in self.named_parameters():
            param.requires_grad_(trainable and (not self.config.anchors_only or name.endswith(".anchor")))

    def __getitem__(self, layer: int) -> LayerGenerator:
        return self.layers[str(layer)]

    def __contains__(self, layer: int) -> bool:
        return str(layer) in self.layers


def check_adapter_name(name: Any) -> None:
    """Adapters live in an nn.ModuleDict: a name must be a usable module key."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter_name must be a non-empty string, got {name!r}")
    if "." in name or hasattr(nn.ModuleDict, name):
        raise ValueError(f"adapter_name {name!r} cannot name an adapter: it contains '.' or is an attribute of "
                         "torch.nn.Module (e.g. 'half', 'train'); choose another name")


class GeneratorBank(nn.Module):
    """Generators of every adapter loaded on one backbone.

    Args:
        hidden_size: d of the backbone.
        num_layers: number of decoder layers of the backbone.
        backbone: its record (``iapt_fast.model.adapter_io.backbone_record``), given to the
            adapters created here.
    """

    def __init__(self, hidden_size: int, num_layers: int, backbone: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.backbone = backbone
        self.num_layers = num_layers
        self.adapters = nn.ModuleDict()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    def add_adapter(self, name: str, config: IAPTConfig, seed: int | None = None,
                    anchors: dict[int, Tensor] | None = None) -> AdapterGenerators:
        """Create a freshly initialised adapter called ``name`` (``anchors``: {layer: [T, d]},
        required by the anchored form)."""
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        adapter = AdapterGenerators(config, self.hidden_size, self.num_layers, seed=seed, anchors=anchors,
                                    backbone=self.backbone)
        self.adapters[name] = adapter
        return adapter

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        del self.adapters[name]

    def __getitem__(self, name: str) -> AdapterGenerators:
        self._require(name)
        return self.adapters[name]

    def _require(self, name: str) -> None:
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; loaded adapters: {self.adapter_names}")

    def layer_weights(self, name: str, layer: int) -> dict[str, Tensor]:
        """Detached copies of adapter ``name``'s weights at ``layer`` (negative counts from the
        end), adapter axis first (A = 1): w_down [1, d, m], w_pool [1, m, T], rat_num [1, p+1],
        rat_den [1, q], w_up [1, m, d]; the anchored form also anchor [1, T, d], anchor_scale [1]."""
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        adapter = self[name]
        if layer < 0:
            layer += self.num_layers
        if layer not in adapter:
            raise ValueError(f"adapter {name!r} has no generator at layer {layer}; its layers: {adapter.layer_indices}")
        return {w: t.detach().clone() for w, t in adapter[layer].weights().items()}

    def stacked_weights(self, layer: int, names: Iterable[str]) -> dict[str, Tensor]:
        """Weights of ``layer`` for ``names``, stacked as [A, ...] in that order (design.md §3).

        All named adapters must share one shape key at this layer. One name gives views.
        """
        names = list(names)
        if not names:
            raise ValueError("names must name at least one adapter")
        gens = []
        for name in names:
            adapter = self[name]
            if layer not in adapter:
                raise ValueError(f"adapter {name!r} has no generator at layer {layer}")
            gens.append(adapter[layer])
        keys = {g.shape_key for g in gens}
        if len(keys) != 1:
            raise ValueError(f"adapters {names} have different generator shapes at layer {layer}: {sorted(keys)}")
        return stack_layers(gens)

    def snapshot(self) -> dict[str, AdapterGenerators]:
        """The loaded adapters by name, as of now. One copy of the underlying dict (atomic under
        the GIL), so adding or deleting adapters in another thread meanwhile can neither make
        it fail nor mix two states of the bank."""
        return dict(self.adapters._modules)


def stack_layers(gens: list[LayerGenerator]) -> dict[str, Tensor]:
    """The weights of same-shape layer generators stacked as [A, ...] in that order (design.md
    §3); gradients reach every generator's own parameters. One generator gives views."""
    if len(gens) == 1:
        return gens[0].weights()
    return {w: torch.stack([getattr(g, w) for g in gens]) for w in gens[0].names}


# ---------------------------------------------------------------------- serving packs
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

"""Parameters of the IAPT prompt generators: every target layer × every adapter.

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
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from iapt_fast.config import CUSTOM_INIT, IAPTConfig
from iapt_fast.generator.rational import fit_rational
from iapt_fast.generator.weights import ANCHOR_NAMES, WEIGHT_NAMES  # the names and their order, defined once

__all__ = ["LayerGenerator", "AdapterGenerators", "GeneratorBank", "WEIGHT_NAMES", "ANCHOR_NAMES", "tensor_names",
           "anchor_scale_of", "stack_layers"]

# The anchored form's extra tensors: a trainable Parameter and a fixed buffer.


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

"""The carrier of one IAPT call: :class:`IAPTCache`, the KV cache the backbone is called with,
which also holds the call's IAPT state (design.md §7).

    IAPTModel.forward / generate
        └─ Request            validated inputs (requests.py), put into a new IAPTCache
    backbone called with cache=IAPTCache (transformers hands it to every layer and attention)
        model pre-hook       Request → PrefillState (launch plan), T zero slots seeded per layer
        layer pre-hook       P_l → prefix keys/values → written into the layer's T slots
        attention pre-hook   layers that hide the prefix drop the mask's T columns
        model post-hook      the prefill is over: decode steps see only the cache
    decode steps: IAPTCache.update hides the T slots from the layers outside target_layers

Everything a call needs lives on its own IAPTCache, so concurrent calls share nothing, and a
decode step (eager or compiled) reads nothing but the cache it is called with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from iapt_fast.generator.bank import AdapterGenerators
from iapt_fast.model.packing import AdapterPack, GroupKey

__all__ = ["Request", "Launch", "PrefillState", "IAPTCache", "PrefixOnlyCache", "check_cache_room", "write_prefix"]


@dataclass(frozen=True)
class Request:
    """One validated IAPT call, before the batch is expanded (beams, return sequences).

    Attributes:
        instruction_mask: [B, N] bool, what the generators pool over.
        row_adapters: adapter name per row; None = the bare backbone.
        attention_mask: [B, T + N] long, the prompt's mask after T prefix columns (1 where the
            row has soft tokens): what the wrapped model is called with.
        num_tokens: T.
        target_layers: the layers whose slots hold the prefix (the batch's adapters share them;
            empty for a batch of base rows only).
        num_layers: of the backbone.
        adapters: name → the adapter object each name meant when the call was validated: the
            call runs those, whatever other threads add or delete meanwhile.
    """

    instruction_mask: Tensor
    row_adapters: list[str | None]
    attention_mask: Tensor
    num_tokens: int
    target_layers: frozenset[int]
    num_layers: int
    adapters: dict[str, AdapterGenerators] = field(default_factory=dict)

    @property
    def hidden_layers(self) -> frozenset[int]:
        """Layers that must not see the T slots (outside ``target_layers``; every layer for a
        batch of base rows only)."""
        return frozenset(range(self.num_layers)) - self.target_layers


@dataclass(frozen=True)
class Launch:
    """Rows of a batch that share one ``prompt_generator`` launch per layer.

    Attributes:
        key: the adapters' shape group.
        rows: [rows] indices into the batch; None = every row.
        ids: [rows] adapter id of each row into the stacked weights.
        names: the adapters ``ids`` index, in id order (the pack's, or those stacked per call).
        pack: serving path: the pre-stacked weights (ids index the pack).
        members: without a pack (training, or an adapter deleted while the call ran): the
            adapter objects to stack per call, in id order.
    """

    key: GroupKey  # also says what the launch pools over and which rational it applies
    rows: Tensor | None
    ids: Tensor
    names: list[str]
    pack: AdapterPack | None
    members: tuple[AdapterGenerators, ...] = ()


@dataclass
class PrefillState:
    """The prefill in flight, from the model pre-hook to the layer and attention hooks.

    Attributes:
        instruction_mask: [B, N]; B is the batch after expansion (beams, return sequences).
        launches: one per shape group of the batch's adapters.
        num_tokens: T.
        rotary: cos/sin at −T…−1 (None for families without rotary embeddings).
        row_adapters: adapter name per row of the expanded batch.
        hidden_layers: as :attr:`Request.hidden_layers`.
        prefix: layer → its prefix (keys, values), each [B, kv_heads, T, head_dim], kept only for
            activation-checkpointed layers (transformers runs them without the cache).
        finite: [B] bool, the row's soft tokens were finite at every target layer so far.
    """

    instruction_mask: Tensor
    launches: list[Launch]
    num_tokens: int
    rotary: tuple[Tensor, Tensor] | None
    row_adapters: list[str | None]
    hidden_layers: frozenset[int]
    prefix: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    finite: Tensor | None = None

    @property
    def last_layer(self) -> int:
        """The last layer where a generator runs (-1: none)."""
        return max((layer for launch in self.launches for layer in launch.key.layers), default=-1)


class IAPTCache(Cache):
    """A transformers KV cache together with the state of the IAPT call that fills it.

    It is a view of ``storage`` (any transformers cache: dynamic, static, with sliding
    layers...): the same layer objects, so the keys and values live in ``storage`` and every
    Cache method behaves as ``storage``'s. Besides them it holds the call: ``request`` until
    the backbone's prefill takes it, ``prefill`` while the prefill runs, and what the decode
    steps need (``num_tokens``, ``prefix_mask``, ``hidden_layers``). Build one per call
    (``IAPTModel`` does); pass the one a prefill returned to continue decoding.

    Args:
        storage: an empty transformers cache (an IAPTCache passes its own storage on).
        request: the validated call.
    """

    def __init__(self, storage: Cache, request: Request) -> None:
        if isinstance(storage, IAPTCache):
            storage = storage.storage
        if not isinstance(storage, Cache):
            raise TypeError(f"cache must be a transformers Cache, got {type(storage).__name__}")
        if int(storage.get_seq_length()) != 0:
            raise ValueError("IAPT prefill needs an empty cache")
        # The same list object: layers a lazy cache adds at its first update land in storage too.
        super().__init__(layers=storage.layers)
        self.layer_class_to_replicate = storage.layer_class_to_replicate
        self.offloading = storage.offloading
        if storage.offloading:
            self.only_non_sliding, self.prefetch_stream = storage.only_non_sliding, storage.prefetch_stream
        self.storage = storage
        self.request: Request | None = request
        self.prefill: PrefillState | None = None
        self.num_tokens = request.num_tokens
        self.hidden_layers = request.hidden_layers
        self.prefix_mask: Tensor | None = None  # [B, T] after expansion, once the prefill started

    @property
    def hides_prefix(self) -> bool:
        """Some layer hides the T slots (decode steps check the sliding window for it)."""
        return bool(self.hidden_layers)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The layer's keys/values after appending the new ones; a layer outside
        ``target_layers`` gets them without the T leading slots (which stay zeros)."""
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx in self.hidden_layers:
            return keys[:, :, self.num_tokens:], values[:, :, self.num_tokens:]
        return keys, values

    def start_prefill(self, state: PrefillState, prefix_mask: Tensor, arch: Any) -> None:
        """Take the request: seed every layer with T zero slots and hold ``state`` for the
        layer hooks.

        Args:
            prefix_mask: [B, T] the mask columns of the slots, B after expansion.
            arch: the backbone's accessors (``model.architectures``).
        """
        batch, num_tokens = prefix_mask.shape
        dtype = arch.activation_dtype()
        for index, layer in enumerate(arch.layers):
            heads, head_dim = arch.kv_shape(layer)
            slots = torch.zeros(batch, heads, num_tokens, head_dim, dtype=dtype, device=arch.layer_device(index))
            super().update(slots, slots, index)
        self.request, self.prefill, self.prefix_mask = None, state, prefix_mask

    def end_prefill(self) -> None:
        """The prefill is over (or failed): decode steps run no generator."""
        self.prefill = None


class PrefixOnlyCache:
    """Stateless stand-in for a KV cache: prepends a fixed prefix. Used inside an activation-
    checkpointed layer, which transformers runs without the cache, so the forward and the
    backward replay see the same prefix."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def check_cache_room(cache: Cache, needed: int, num_tokens: int) -> None:
    """Refuse a static cache too short for ``needed`` entries (T prefix slots included) in one
    of its full-attention layers (sliding layers roll over), before it fails inside an index copy."""
    for index, layer in enumerate(getattr(cache, "layers", ())):
        room = int(layer.get_max_length())
        if room >= 0 and not getattr(layer, "is_sliding", False) and needed > room:
            raise ValueError(f"the static cache holds {room} tokens per layer (layer {index}), but this call needs "
                             f"{needed}: the {num_tokens} IAPT prefix slots come first, so build it with "
                             f"max_cache_len >= T + prompt + new tokens")


def write_prefix(cache: Cache, index: int, keys: Tensor, values: Tensor) -> None:
    """Put layer ``index``'s prefix keys/values [B, kv_heads, T, head_dim] into the T slots its
    cache layer was seeded with: a dynamic layer takes the tensors (they keep their graph); a
    static layer copies them into its first T slots, in place (its buffers keep the fixed
    address a compiled or CUDA-graph decode step reads)."""
    slot = cache.layers[index]
    num_tokens = keys.shape[-2]
    if getattr(slot, "is_compileable", False):
        # Shapes only: the seeded length lives in a device tensor, and reading it would sync
        # once per layer at every prefill (start_prefill wrote the slots just before).
        if not slot.is_initialized or slot.keys.shape[-2] < num_tokens or slot.keys.shape[0] != keys.shape[0]:
            raise RuntimeError(f"IAPT: layer {index} of the static cache has no room for the seeded prefix slots")
        slot.keys[:, :, :num_tokens].copy_(keys)
        slot.values[:, :, :num_tokens].copy_(values)
        return
    if slot.keys is None or slot.keys.shape[-2] != num_tokens:
        raise RuntimeError(f"IAPT: layer {index} of the cache does not hold exactly the seeded prefix slots")
    slot.keys, slot.values = keys, values

"""How the prefix lives in a transformers KV cache (design.md §7).

An IAPT prefill seeds every layer of the cache with T leading slots, so every layer holds one
length and the model builds one mask (T prefix columns, then the real tokens):

* a layer in ``target_layers`` gets its prefix keys/values written into those slots
  (:func:`write_prefix`: dynamic layers take the tensors, static layers copy in place);
* any other layer's cache layer is replaced by an equal one that mixes in
  :class:`HiddenPrefixLayer`: it keeps the slots but hands attention only what follows them.
  The decision lives in the cache itself, so a decode step (eager or compiled) reads nothing
  but the cache it is called with.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

__all__ = ["PrefixOnlyCache", "HiddenPrefixLayer", "hiding_prefix", "plain_layer", "cache_in_use", "cache_layer", "check_cache_room",
           "seed_cache", "write_prefix"]


class PrefixOnlyCache:
    """Stateless stand-in for a KV cache: prepends a fixed prefix. Used inside an activation-
    checkpointed layer, which runs without the cache, so the backward replay sees the same prefix."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class HiddenPrefixLayer:
    """Mixin of a cache layer whose decoder layer must not see the prefix (outside
    ``target_layers``, or a batch of base rows only): ``update`` returns the keys/values after
    the T leading slots, which stay zeros. Everything else is the layer's own class's (sizes,
    beam reordering, cropping; transformers' isinstance checks see that class)."""

    _layer_type = None  # never registered as a layer type of transformers' mappings
    _plain_class: type  # the layer's own class
    num_tokens: int

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        return keys[:, :, self.num_tokens:], values[:, :, self.num_tokens:]


_HIDING_CLASSES: dict[type, type] = {}


def _same_state(layer: Any, cls: type) -> Any:
    """A ``cls`` object with ``layer``'s state (the same tensors); ``layer`` is left as it was."""
    twin = object.__new__(cls)
    twin.__dict__.update(vars(layer))
    return twin


def hiding_prefix(layer: Any, num_tokens: int) -> Any:
    """A cache layer equal to ``layer`` (the same tensors and state, its own class's behaviour)
    that hides its T leading slots from attention."""
    base = plain_layer(layer).__class__
    cls = _HIDING_CLASSES.get(base)
    if cls is None:
        cls = _HIDING_CLASSES[base] = type(f"HiddenPrefix{base.__name__}", (HiddenPrefixLayer, base),
                                           {"_layer_type": None, "_plain_class": base, "__module__": __name__})
    hidden = _same_state(plain_layer(layer), cls)
    hidden.num_tokens = num_tokens
    return hidden


def plain_layer(layer: Any) -> Any:
    """``layer`` as its own class again if an earlier prefill made it hide the prefix (a cache
    reused after ``reset()``), else ``layer`` itself."""
    if not isinstance(layer, HiddenPrefixLayer):
        return layer
    plain = _same_state(layer, type(layer)._plain_class)
    plain.__dict__.pop("num_tokens", None)
    return plain


def cache_layer(cache: Any, index: int) -> Any:
    """Layer ``index`` of a transformers cache, or None (no cache, or not built yet)."""
    layers = getattr(cache, "layers", None)
    if layers is None or index >= len(layers):
        return None
    return layers[index]


def cache_in_use(cache: Any) -> bool:
    """Whether ``cache`` holds entries already (a decode step), read from a plain flag of its
    first layer (lazily initialised by its first update), never from a tensor."""
    layer = cache_layer(cache, 0)
    return bool(layer is not None and getattr(layer, "is_initialized", False))


def seed_cache(cache: Any, arch: Any, batch: int, num_tokens: int, hidden_layers: Iterable[int]) -> None:
    """Give every layer of an empty ``cache`` T zero slots; ``hidden_layers`` will hide them."""
    for index in range(len(getattr(cache, "layers", ()))):
        cache.layers[index] = plain_layer(cache.layers[index])
    dtype = arch.activation_dtype()
    for index, layer in enumerate(arch.layers):
        heads, head_dim = arch.kv_shape(layer)
        slots = torch.zeros(batch, heads, num_tokens, head_dim, dtype=dtype, device=arch.layer_device(index))
        cache.update(slots, slots, index)
    for index in hidden_layers:
        cache.layers[index] = hiding_prefix(cache.layers[index], num_tokens)


def check_cache_room(cache: Any, needed: int, num_tokens: int) -> None:
    """Refuse a static cache too short for ``needed`` entries (T prefix slots included) in one
    of its full-attention layers (sliding layers roll over), before it fails inside an index copy."""
    for index, layer in enumerate(getattr(cache, "layers", ())):
        room = int(layer.get_max_length())
        if room >= 0 and not getattr(layer, "is_sliding", False) and needed > room:
            raise ValueError(f"the static cache holds {room} tokens per layer (layer {index}), but this call needs "
                             f"{needed}: the {num_tokens} IAPT prefix slots come first, so build it with "
                             f"max_cache_len >= T + prompt + new tokens")


def write_prefix(slot: Any, index: int, keys: Tensor, values: Tensor) -> None:
    """Put layer ``index``'s prefix keys/values [B, kv_heads, T, head_dim] into the T slots its
    cache layer was seeded with: a dynamic layer takes the tensors (they keep their graph); a
    static layer copies them into its first T slots, in place (its buffers keep the fixed
    address a compiled or CUDA-graph decode step reads)."""
    num_tokens = keys.shape[-2]
    if getattr(slot, "is_compileable", False):
        # Shapes only: the seeded length lives in a device tensor, and reading it would sync
        # once per layer at every prefill (seed_cache wrote the slots just before).
        if not slot.is_initialized or slot.keys.shape[-2] < num_tokens or slot.keys.shape[0] != keys.shape[0]:
            raise RuntimeError(f"IAPT: layer {index} of the static cache has no room for the seeded prefix slots")
        slot.keys[:, :, :num_tokens].copy_(keys)
        slot.values[:, :, :num_tokens].copy_(values)
        return
    if slot.keys is None or slot.keys.shape[-2] != num_tokens:
        raise RuntimeError(f"IAPT: layer {index} of the cache does not hold exactly the seeded prefix slots")
    slot.keys, slot.values = keys, values

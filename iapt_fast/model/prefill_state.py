"""The state of one IAPT call, as types: what travels from ``forward`` / ``generate`` to the
hooks, and what a KV cache filled by an IAPT prefill remembers for its decode steps.

    IAPTModel.forward / generate
        └─ Request                (validated inputs; one per call, in a ContextVar: per thread and task)
    model pre-hook (prefix_hooks.py)
        ├─ PrefillState           (launch plan + instruction mask; rides the model's keyword
        │                          arguments down to every decoder layer)
        └─ CacheState             (registered for the cache object; read by every decode step)
    layer pre-hook → PrefixKV keyword argument → attention pre-hook → the cache's T slots
"""
from __future__ import annotations

import contextvars
import weakref
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from iapt_fast.model.packing import AdapterPack, GroupKey

__all__ = ["Request", "Launch", "PrefillState", "CacheState", "cache_state", "register_cache", "PENDING"]


@dataclass(frozen=True)
class Request:
    """One validated IAPT call, before the batch is expanded (beams, return sequences).

    Attributes:
        instruction_mask: [B, N] bool, what the generators pool over.
        row_adapters: adapter name per row; None = the bare backbone.
        prefix_mask: [B, T] 1 where the row has soft tokens.
        num_tokens: T.
        hides_prefix: some layer must hide the T slots (layers outside ``target_layers``, or a
            batch of base rows only).
    """

    instruction_mask: Tensor
    row_adapters: list[str | None]
    prefix_mask: Tensor
    num_tokens: int
    hides_prefix: bool


@dataclass(frozen=True)
class Launch:
    """Rows of a batch that share one ``prompt_generator`` launch per layer.

    Attributes:
        key: the adapters' shape group.
        rows: [rows] indices into the batch; None = every row.
        ids: [rows] adapter id of each row into the stacked weights.
        names: training path: the adapters stacked, in id order.
        pack: serving path: the pre-stacked weights (ids index the pack).
    """

    key: GroupKey  # also says what the launch pools over and which rational it applies
    rows: Tensor | None
    ids: Tensor
    names: list[str]
    pack: AdapterPack | None


@dataclass
class PrefillState:
    """The prefill in flight: handed to every decoder layer with the model's keyword arguments
    (so a checkpointed layer replayed in backward sees it too)."""

    instruction_mask: Tensor  # [B, N]: B is the batch after expansion (beams, return sequences)
    launches: list[Launch]
    num_tokens: int
    rotary: tuple[Tensor, Tensor] | None = None  # cos/sin at −T…−1, computed by the first target layer


@dataclass(frozen=True)
class CacheState:
    """What a KV cache seeded by an IAPT prefill holds besides keys and values.

    Attributes:
        num_tokens: T, the leading slots of every layer.
        prefix_mask: [B, T] mask columns of the slots (decode steps prepend them).
        target_layers: layers whose slots hold the prefix; the others hide their slots.
        hides_prefix: as in :class:`Request`.
    """

    num_tokens: int
    prefix_mask: Tensor
    target_layers: frozenset[int] = field(default_factory=frozenset)
    hides_prefix: bool = False


# The request of the call in flight, from forward()/generate() to the model pre-hook. A
# ContextVar is per thread and per asyncio task, so concurrent calls on one IAPTModel never
# see each other's request; the value is (owner, request), so a call on one IAPTModel never
# hands its request to another.
PENDING: contextvars.ContextVar[tuple[Any, Request] | None] = contextvars.ContextVar(
    "iapt_pending_request", default=None)

# Cache object → its IAPT state, without writing attributes onto transformers' objects.
_CACHES: "weakref.WeakKeyDictionary[Any, CacheState]" = weakref.WeakKeyDictionary()


def register_cache(cache: Any, state: CacheState) -> None:
    _CACHES[cache] = state


def cache_state(cache: Any) -> CacheState | None:
    """The state of a cache an IAPT prefill filled, or None for any other cache."""
    if cache is None:
        return None
    try:
        return _CACHES.get(cache)
    except TypeError:  # an unhashable stand-in
        return None

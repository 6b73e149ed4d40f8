"""The state of one IAPT call, as types: what travels from ``forward`` / ``generate`` to the
hooks, and what a KV cache filled by an IAPT prefill remembers for its decode steps.

    IAPTModel.forward / generate
        └─ Request                (validated inputs; one per call, in a ContextVar: per thread and task)
    model pre-hook (prefix_hooks.py)
        ├─ PrefillState           (launch plan + instruction mask; rides the model's keyword
        │                          arguments down to every decoder layer)
        └─ CacheState             (registered for the cache object; read by every decode step)
    layer pre-hook → PrefixKV keyword argument → attention pre-hook → the cache's T slots
    decode steps: read only the cache (prefix_cache.py: its layers say which hide the T slots)
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

from torch import Tensor

from iapt_fast.generator.bank import AdapterGenerators
from iapt_fast.model.packing import AdapterPack, GroupKey

__all__ = ["Request", "Launch", "PrefillState", "CacheState", "cache_state", "register_cache", "PendingRequests",
           "PENDING"]


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
    def hides_prefix(self) -> bool:
        """Some layer must hide the T slots (layers outside ``target_layers``, or a batch of
        base rows only)."""
        return len(self.target_layers) != self.num_layers


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
    """The prefill in flight: handed to every decoder layer with the model's keyword arguments
    (so a checkpointed layer replayed in backward sees it too)."""

    instruction_mask: Tensor  # [B, N]: B is the batch after expansion (beams, return sequences)
    launches: list[Launch]
    num_tokens: int
    rotary: tuple[Tensor, Tensor] | None = None  # cos/sin at −T…−1, computed by the first target layer
    row_adapters: list[str | None] = field(default_factory=list)  # per row of the expanded batch
    finite: Tensor | None = None  # [B] bool: the row's soft tokens were finite at every target layer so far

    @property
    def last_layer(self) -> int:
        """The last layer where a generator runs (-1: none)."""
        return max((layer for launch in self.launches for layer in launch.key.layers), default=-1)


@dataclass(frozen=True)
class CacheState:
    """What a KV cache seeded by an IAPT prefill holds besides keys and values.

    Attributes:
        num_tokens: T, the leading slots of every layer.
        prefix_mask: [B, T] mask columns of the slots (decode steps prepend them).
        hides_prefix: as in :class:`Request` (its layers' caches are HiddenPrefixLayer).
    """

    num_tokens: int
    prefix_mask: Tensor
    hides_prefix: bool = False


class PendingRequests:
    """The request of the call in flight, from forward()/generate() to the model pre-hook.

    The request lives in a ContextVar, which is per thread and per asyncio task, so concurrent
    calls on one IAPTModel never see each other's request; the value is (owner, request), so a
    call on one IAPTModel never hands its request to another. Beside it, a plain flag says
    whether any request anywhere waits for its prefill, so a call of the backbone while none
    does never touches the ContextVar (which torch.compile cannot trace). Decode steps read
    neither: their cache holds a prefill already (prefix_hooks).
    """

    def __init__(self) -> None:
        self._var: contextvars.ContextVar[tuple[Any, Request] | None] = contextvars.ContextVar(
            "iapt_pending_request", default=None)
        self._lock = threading.Lock()
        self._waiting = 0  # submitted requests whose prefill has not run
        self.any = False  # _waiting > 0, as a bool (a compiled step guards on it: two variants at most)

    @contextlib.contextmanager
    def submit(self, owner: Any, request: Request) -> Iterator[None]:
        """Make ``request`` the pending one of ``owner`` for the calls inside the block."""
        token = self._var.set((owner, request))
        self._count(+1)
        try:
            yield
        finally:
            if self._var.get() is not None:  # the model never ran (an error before its prefill)
                self._count(-1)
            self._var.reset(token)

    def take(self, owner: Any) -> Request | None:
        """The request ``owner``'s prefill serves (once), or None: a decode step, or another model's."""
        pending = self._var.get()
        if pending is None or pending[0] is not owner:
            return None
        self._var.set(None)  # one prefill per request; decode steps pass straight through
        self._count(-1)
        return pending[1]

    def get(self) -> tuple[Any, Request] | None:
        """(owner, request) pending in this thread / task, if any."""
        return self._var.get()

    def _count(self, step: int) -> None:
        with self._lock:
            self._waiting += step
            self.any = self._waiting > 0


PENDING = PendingRequests()

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

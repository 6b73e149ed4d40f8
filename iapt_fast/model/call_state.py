"""One IAPT call's state: validated into a :class:`Request`, planned into generator launches,
carried by the :class:`IAPTCache` the backbone is called with (design.md §7).

    IAPTModel.forward / generate
        └─ Request            validated inputs (make_request, here), put into a new IAPTCache
    backbone called with cache=IAPTCache (transformers hands it to every layer and attention)
        model pre-hook       Request → PrefillState (plan_launches), T zero slots seeded per layer
        layer pre-hook       P_l → prefix keys/values → written into the layer's T slots
        attention pre-hook   layers that hide the prefix drop the mask's T columns
        model post-hook      the prefill is over: decode steps see only the cache
    decode steps: IAPTCache.update hides the T slots from the layers outside target_layers

Everything a call needs lives on its own IAPTCache, so concurrent calls share nothing, and a
decode step (eager or compiled) reads nothing but the cache it is called with. Validation runs
before the backbone: a bad call raises ValueError / TypeError naming the argument, and nothing
has been computed yet.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Sequence

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from iapt_fast.generator.bank import AdapterGenerators, AdapterPack, GeneratorBank, GroupKey, ServingPacks, group_key
from iapt_fast.model.architectures import Architecture

__all__ = ["Request", "Launch", "PrefillState", "IAPTCache", "PrefixOnlyCache", "check_cache_room",
           "write_prefix", "BASE_ADAPTER", "VERIFIED_ATTENTION", "SUPPORTED_CACHES", "check_inputs",
           "check_labels", "check_checkpointing", "check_generate_kwargs", "cache_implementation",
           "static_cache_length", "check_mask", "decode_step_may_compile", "make_request", "require_active",
           "plan_launches",
           "prompt_before_labels", "positions", "max_new_tokens"]

# Name a row of a mixed batch can use to run the bare backbone (its prefix slots are masked).
BASE_ADAPTER = "__base__"
# KV caches generate() may build around the prefix (None: the dynamic default).
SUPPORTED_CACHES = (None, "dynamic", "static")
# Attention implementations verified against the slow reference; others build their masks
# differently (flash: unpadding; flex: block masks) and are refused, not guessed.
VERIFIED_ATTENTION = ("eager", "sdpa")


# ---------------------------------------------------------------------- the state and its carrier
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

    def start_prefill(self, state: PrefillState, prefix_mask: Tensor, arch: Architecture,
                      dtype: torch.dtype) -> None:
        """Take the request: seed every layer with T zero slots and hold ``state`` for the
        layer hooks.

        Args:
            prefix_mask: [B, T] the mask columns of the slots, B after expansion.
            arch: the backbone's accessors (architectures.py).
            dtype: the backbone's activation dtype (``arch.activation_dtype()``), of the slots.
        """
        batch, num_tokens = prefix_mask.shape
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


# ------------------------------------------------------------ validating a call, planning its launches
def check_inputs(input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
    """The batch's input tensor, after checking it is [B, N] ids (or [B, N, d] embeddings), B, N >= 1."""
    if input_ids is None and inputs_embeds is None:
        raise ValueError("pass input_ids [B, N] or inputs_embeds [B, N, d]")
    name, inputs, dims = ("input_ids", input_ids, 2) if input_ids is not None else ("inputs_embeds", inputs_embeds, 3)
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(inputs).__name__}")
    if inputs.dim() != dims:
        raise ValueError(f"{name} must be {'[B, N]' if dims == 2 else '[B, N, d]'}, got shape {tuple(inputs.shape)}"
                         + (" (a single sequence needs a batch axis: input_ids[None])" if inputs.dim() == dims - 1 else ""))
    if dims == 2 and (inputs.dtype.is_floating_point or inputs.dtype == torch.bool):
        raise TypeError(f"input_ids must be integer token ids, got {inputs.dtype}")
    if inputs.shape[0] == 0 or inputs.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one token, got shape {tuple(inputs.shape)}")
    return inputs


def check_labels(labels: Tensor | None, batch: int, length: int) -> None:
    if labels is not None and (not isinstance(labels, Tensor) or tuple(labels.shape) != (batch, length)):
        raise ValueError(f"labels must be a [B, N] = {(batch, length)} tensor like input_ids, "
                         f"got {tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")


def check_checkpointing(arch: Architecture) -> None:
    """Refuse reentrant activation checkpointing before a training forward."""
    if arch.reentrant_checkpointing():
        raise ValueError("IAPT needs non-reentrant activation checkpointing (the prefix reaches each layer as a "
                         "keyword argument, which reentrant checkpointing cannot differentiate): call "
                         "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})")


_UNSUPPORTED_GENERATE = MappingProxyType({
    "assistant_model": "assisted decoding",
    "prompt_lookup_num_tokens": "prompt-lookup decoding",
    "prefill_chunk_size": "chunked prefill",
    "inputs_embeds": "generation from inputs_embeds",
})


def check_generate_kwargs(model: Any, generate_kwargs: dict) -> None:
    """Refuse generate() options the prefix cache does not support yet, naming each."""
    for key, what in _UNSUPPORTED_GENERATE.items():
        if generate_kwargs.get(key) is not None:
            raise ValueError(f"IAPTModel.generate does not support {what} ({key}=) yet")
    if generate_kwargs.get("use_cache") is False or getattr(generation_config(model, generate_kwargs), "use_cache",
                                                             True) is False:
        raise ValueError("IAPTModel.generate needs use_cache=True: the prefix lives in the KV cache")
    for key in ("cache", "past_key_values"):
        if generate_kwargs.get(key) is not None:
            raise ValueError(f"IAPTModel.generate starts from an empty cache; do not pass {key}=")
    implementation = cache_implementation(model, generate_kwargs)
    if implementation not in SUPPORTED_CACHES:
        raise ValueError(f"cache_implementation={implementation!r} is not supported with IAPT yet "
                         f"(use one of {SUPPORTED_CACHES[1:]})")


def generation_config(model: Any, generate_kwargs: dict) -> Any:
    """The GenerationConfig ``generate(**generate_kwargs)`` starts from: the call's, else the model's."""
    return generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)


def cache_implementation(model: Any, generate_kwargs: dict) -> str | None:
    """The KV cache ``generate(**generate_kwargs)`` will build (None: the dynamic default)."""
    if "cache_implementation" in generate_kwargs:
        return generate_kwargs["cache_implementation"]
    config = generation_config(model, generate_kwargs)
    return getattr(config, "cache_implementation", None)


def decode_step_may_compile(model: Any, generate_kwargs: dict) -> bool:
    """Whether ``generate(**generate_kwargs)`` may ``torch.compile`` its decode step.

    transformers compiles it for a compileable cache (here: static) unless ``disable_compile``,
    on an accelerator, or on any device when ``compile_config._compile_all_devices`` (see
    ``iapt_fast.compat.decode_compile_config``). Over-approximated (every device but the CPU
    counts as an accelerator): a wrong True costs only concurrency (the compile gate, iapt_model.py).
    """
    if cache_implementation(model, generate_kwargs) != "static":
        return False
    config = generation_config(model, generate_kwargs)
    if generate_kwargs.get("disable_compile", getattr(config, "disable_compile", False)):
        return False
    compile_config = generate_kwargs.get("compile_config", getattr(config, "compile_config", None))
    device = getattr(model, "device", None)
    on_accelerator = device is not None and torch.device(device).type != "cpu"
    return on_accelerator or bool(getattr(compile_config, "_compile_all_devices", False))


def static_cache_length(model: Any, generate_kwargs: dict, num_tokens: int, length: int, new_tokens: int) -> int:
    """``max_cache_len`` of a static cache for a prompt of ``length`` that gains ``new_tokens``:
    T more slots than the base model's (the prefix takes the first T). A ``max_cache_len`` the
    caller set (room for that many real tokens, to keep compiled shapes across calls) gains T too."""
    config = generation_config(model, generate_kwargs)
    asked = generate_kwargs.get("max_cache_len", getattr(config, "max_cache_len", None))
    return num_tokens + max(int(asked or 0), length + new_tokens)


def check_mask(mask: Tensor | None, name: str, batch: int, length: int, device) -> Tensor:
    """``mask`` as a [B, N] long tensor of 0/1 on ``device`` (None: all ones)."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.long, device=device)
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must be [B, N] = {(batch, length)}, got {tuple(mask.shape)}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or integer (1 = token), got {mask.dtype}")
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"{name} must hold only 0 and 1")
    return mask.to(device=device, dtype=torch.long)


def prompt_before_labels(labels: Tensor, mask: Tensor) -> Tensor:
    """[B, N] instruction mask: each row's real tokens before its first label that is not −100.

    Rows without labels keep every real token (they predict nothing). A row whose first real
    token is already labelled (plain language-model data) has no instruction to read.
    """
    if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(mask.shape):
        raise ValueError(f"labels must be a [B, N] = {tuple(mask.shape)} tensor like input_ids, "
                         f"got {getattr(labels, 'shape', type(labels).__name__)}")
    labelled = labels.to(mask.device).ne(-100) & mask.bool()
    before = labelled.long().cumsum(-1).eq(0)
    inst = before & mask.bool()
    has_labels = labelled.any(-1)
    inst = torch.where(has_labels[:, None], inst, mask.bool())
    empty = has_labels & ~inst.any(-1)
    if empty.any():
        rows = torch.nonzero(empty).flatten().tolist()
        raise ValueError(f"rows {rows} are labelled from their first token on, so no instruction can be derived "
                         "from labels (the generators would read the answer they predict): pass instruction_mask=, "
                         "1 on the prompt tokens")
    return inst.long()


def positions(mask: Tensor) -> Tensor:
    """Position ids as the base model gives them: cumsum of the mask − 1, 0 on padding."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def max_new_tokens(model: Any, length: int, generate_kwargs: dict) -> int:
    """How many tokens ``generate(**generate_kwargs)`` may add to a prompt of ``length``."""
    config = generation_config(model, generate_kwargs)
    new = generate_kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if new is None:
        total = generate_kwargs.get("max_length", getattr(config, "max_length", None))
        new = max(0, total - length) if total is not None else 0
    return int(new)


def make_request(bank: GeneratorBank, arch: Architecture, active: str | None, mask: Tensor,
                 instruction_mask: Tensor | None, adapter_names: Sequence[str | None] | None, *,
                 new_tokens: int = 0) -> Request:
    """Validate one call (attention kernel, masks, adapter names, compatibility) into a Request.

    Args:
        active: the adapter of rows without ``adapter_names``.
        mask: [B, N] the checked attention mask.
        new_tokens: tokens generate() may add (sliding-window check).
    """
    batch, length = mask.shape
    implementation = getattr(arch.model.config, "_attn_implementation", None)
    if implementation not in VERIFIED_ATTENTION:
        raise ValueError(f"attn_implementation={implementation!r} is not supported by IAPT yet; "
                         f"use one of {VERIFIED_ATTENTION}")
    if instruction_mask is None:
        inst = mask.bool()
    else:
        inst = check_mask(instruction_mask, "instruction_mask", batch, length, mask.device).bool()
        if (inst & ~mask.bool()).any():
            rows = torch.nonzero((inst & ~mask.bool()).any(dim=1)).flatten().tolist()
            raise ValueError(f"instruction_mask marks padding tokens (attention_mask = 0) in rows {rows}")
    loaded = bank.snapshot()  # one state of the bank for the whole call, whatever other threads do
    rows = row_adapters(loaded, active, adapter_names, batch)
    used = {n: loaded[n] for n in rows if n is not None}
    if used:
        num_tokens = check_compatible(used)
    else:
        num_tokens = loaded[loaded_active(loaded, active)].config.num_soft_tokens  # base rows only
    target_layers = frozenset(next(iter(used.values())).layer_indices) if used else frozenset()
    hides = len(target_layers) != arch.num_layers
    arch.check_prefix_support(num_tokens, hides, length + new_tokens)
    empty = ~inst.any(dim=1)
    has_prefix = torch.tensor([n is not None for n in rows], device=mask.device)
    if (empty & has_prefix).any():
        bad = torch.nonzero(empty & has_prefix).flatten().tolist()
        raise ValueError(f"rows {bad} have an empty instruction (instruction_mask is all zeros); "
                         "every row needs at least one instruction token")
    prefix_mask = has_prefix[:, None].expand(batch, num_tokens).long()
    return Request(instruction_mask=inst, row_adapters=rows, attention_mask=torch.cat([prefix_mask, mask.long()], dim=1),
                   num_tokens=num_tokens, target_layers=target_layers, num_layers=arch.num_layers, adapters=used)


def require_active(bank: GeneratorBank, active: str | None) -> str:
    return require_active_names(bank.adapter_names, active)


def require_active_names(names: list[str], active: str | None) -> str:
    if active is None:
        if names:
            raise ValueError(f"no active adapter; call set_adapter(name) or pass adapter_names= (loaded: {names})")
        raise ValueError("no adapter is loaded; add_adapter or load_adapter first")
    return active


def loaded_active(loaded: dict[str, AdapterGenerators], active: str | None) -> str:
    """The active adapter's name, checked against ``loaded`` (a :meth:`GeneratorBank.snapshot`)."""
    if active is not None and active not in loaded:  # deleted by another thread as this call began
        raise ValueError(f"the active adapter {active!r} is not loaded; loaded adapters: {list(loaded)}")
    return require_active_names(list(loaded), active)


def row_adapters(loaded: dict[str, AdapterGenerators], active: str | None, adapter_names,
                 batch: int) -> list[str | None]:
    """One adapter name per row (None = the bare backbone), every name checked against
    ``loaded`` (a :meth:`GeneratorBank.snapshot`)."""
    if adapter_names is None:
        return [loaded_active(loaded, active)] * batch
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"adapter_names must be a list of adapter names (one per row), got {adapter_names!r}")
    if len(adapter_names) != batch:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows")
    rows: list[str | None] = []
    for name in adapter_names:
        if name is None or name == BASE_ADAPTER:
            rows.append(None)
        elif not isinstance(name, str):
            raise TypeError(f"adapter_names entries must be strings, got {name!r}")
        elif name not in loaded:
            raise ValueError(f"unknown adapter {name!r} in adapter_names; loaded adapters: {list(loaded)}")
        else:
            rows.append(name)
    return rows


def check_compatible(adapters: dict[str, AdapterGenerators]) -> int:
    """T of adapters (name → adapter) that may share a batch (their soft tokens share the KV
    cache slots)."""
    seen: dict[tuple, str] = {}
    for name, adapter in adapters.items():
        key = (tuple(adapter.layer_indices), adapter.config.num_soft_tokens)
        seen.setdefault(key, name)
    if len(seen) > 1:
        desc = "; ".join(f"{n!r}: layers {k[0]}, T={k[1]}" for k, n in seen.items())
        raise ValueError("adapters in one batch must share target_layers and num_soft_tokens "
                         f"(their soft tokens share the KV cache slots); got {desc}")
    return next(iter(seen))[1]


def plan_launches(packs: ServingPacks, rows: list[str | None], adapters: dict[str, AdapterGenerators],
                  device) -> list[Launch]:
    """Split the rows of a batch into generator launches, one per shape group.

    Args:
        rows: adapter name per row (None = the bare backbone).
        adapters: name → the adapter object the call validated (``Request.adapters``).

    Serving (no gradient needed) gathers from the pre-stacked packs; training stacks the
    batch's adapters per call, so gradients reach their own parameters. So does serving an
    adapter that another thread deleted after the call was validated: the call still runs
    the adapter it named.
    """
    used = {n: adapters[n] for n in dict.fromkeys(r for r in rows if r is not None)}
    serving = not torch.is_grad_enabled() or not any(
        p.requires_grad for adapter in used.values() for p in adapter.parameters())
    placed = packs.locate(used) if serving else {}
    group: dict[str, tuple[GroupKey, AdapterPack | None]] = {
        n: (placed[n][0].key, placed[n][0]) if n in placed else (group_key(a), None) for n, a in used.items()}
    by_group: dict[tuple[GroupKey, int], list[int]] = {}
    for row, name in enumerate(rows):
        if name is not None:
            key, pack = group[name]
            by_group.setdefault((key, id(pack)), []).append(row)
    launches = []
    for members in by_group.values():
        names = [rows[r] for r in members]
        key, pack = group[names[0]]
        row_index = None if len(members) == len(rows) else torch.tensor(members, device=device)
        if pack is not None:
            ids = torch.tensor([placed[n][1] for n in names], device=device)
            launches.append(Launch(key=key, rows=row_index, ids=ids, names=pack.names, pack=pack))
        else:
            distinct = list(dict.fromkeys(names))
            position = {n: i for i, n in enumerate(distinct)}
            ids = torch.tensor([position[n] for n in names], device=device)
            launches.append(Launch(key=key, rows=row_index, ids=ids, names=distinct, pack=None,
                                   members=tuple(used[n] for n in distinct)))
    return launches

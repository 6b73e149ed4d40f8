"""Validating one IAPT call and planning its generator launches (rows → launches).

Everything here runs before the backbone: a bad call raises ValueError / TypeError naming the
argument, and nothing has been computed yet.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Sequence

import torch
from torch import Tensor

from iapt_fast.model.architectures import Architecture
from iapt_fast.generator.bank import AdapterGenerators, GeneratorBank
from iapt_fast.model.packing import AdapterPack, GroupKey, ServingPacks, group_key
from iapt_fast.model.iapt_cache import Launch, Request

__all__ = ["BASE_ADAPTER", "VERIFIED_ATTENTION", "SUPPORTED_CACHES", "check_inputs", "check_labels",
           "check_checkpointing", "check_generate_kwargs", "cache_implementation", "static_cache_length", "check_mask",
           "decode_step_may_compile",
           "make_request", "plan_launches", "prompt_before_labels", "positions", "max_new_tokens"]

# Name a row of a mixed batch can use to run the bare backbone (its prefix slots are masked).
BASE_ADAPTER = "__base__"
# KV caches generate() may build around the prefix (None: the dynamic default).
SUPPORTED_CACHES = (None, "dynamic", "static")
# Attention implementations verified against the slow reference; others build their masks
# differently (flash: unpadding; flex: block masks) and are refused, not guessed.
VERIFIED_ATTENTION = ("eager", "sdpa")


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
    counts as an accelerator): a wrong True costs only concurrency (compile_gate.py).
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

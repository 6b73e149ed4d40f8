"""Placing a model for a distributed job: FSDP2 sharding, the DDP wrapper, and moving whole
tensors in and out of DTensor shards (checkpoints are always written whole)."""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from iapt_fast.compat import ddp_buffer_kwargs, distribute_tensor_from_local_copies
from iapt_fast.training.dist_context import SINGLE_PROCESS, DistContext

__all__ = ["is_dtensor", "full_tensor", "prepare_model", "ddp_wrap", "shard_like", "copy_into", "load_optimizer",
           "full_optimizer_state", "gathered_adapter", "save_adapter"]


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor behind a (possibly FSDP-sharded) parameter or state; collective for DTensors."""
    return t.full_tensor() if is_dtensor(t) else t


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The backbone's repeated blocks: FSDP's units of sharding.

    IAPTModel names them (``decoder_layers``); any other transformers model names their
    class in ``_no_split_modules``.
    """
    layers = getattr(model, "decoder_layers", None)
    if layers is not None:
        return list(layers)
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def _broadcast_trainable(model: nn.Module, ctx: DistContext) -> None:
    """Rank 0's initial generator weights on every rank.

    The frozen backbone comes from the same file everywhere; freshly initialised generators
    would differ between ranks if a user seeded differently, and neither DDP (we skip its
    whole-model broadcast) nor FSDP (which shards what each rank holds) would notice.
    """
    import torch.distributed as dist

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def prepare_model(model: nn.Module, ctx: DistContext, reshard_after_forward: bool = True) -> nn.Module:
    """Place ``model`` for ``ctx`` before the optimizer is built; returns the same module.

    none/ddp: moves it to ``ctx.device`` and (ddp) gives every rank rank 0's trainable weights;
    the DDP wrapper itself is made by :func:`ddp_wrap` (the Trainer calls it). fsdp: also shards it in
    place with FSDP2 ``fully_shard`` — each decoder layer, then the root — so parameter names
    are unchanged and parameters become DTensors. Pass the model still on the CPU: each layer
    then reaches the GPU one at a time and only as its shard, so a backbone larger than one
    GPU fits. Call it once, before building an optimizer (FSDP replaces the parameter objects).
    """
    if not isinstance(ctx, DistContext):
        raise TypeError(f"ctx must be a DistContext, got {type(ctx).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters")
    if any(is_dtensor(p) for p in model.parameters()):
        raise ValueError("model is already sharded (its parameters are DTensors); call prepare_model once")
    if ctx.strategy != "fsdp":
        model.to(ctx.device)
    if ctx.strategy == "none":
        return model
    _broadcast_trainable(model, ctx)  # CPU tensors travel on gloo (see init_distributed)
    if ctx.strategy == "ddp":
        return model
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as err:  # pragma: no cover - torch < 2.6
        raise RuntimeError(f"distributed='fsdp' needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6): {err}") from err
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    layers = _decoder_layers(model)
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # The root group: generators (used from hooks inside the root's forward), embeddings, head.
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    model.to(ctx.device)  # buffers (rotary tables) that no group moved; sharded parameters stay put
    return model


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (the same on every rank) laid out as the DTensor ``like``; every rank must call it."""
    return distribute_tensor_from_local_copies(full.to(like.device), like.device_mesh, like.placements)


def copy_into(param: Tensor, full: Tensor) -> None:
    """Copy a whole tensor into a parameter, or into this rank's shard of a DTensor one."""
    if is_dtensor(param):
        param.to_local().copy_(shard_like(full.to(param.dtype), param).to_local())
    else:
        param.copy_(full)


def load_optimizer(optimizer: torch.optim.Optimizer, sd: Mapping[str, Any]) -> None:
    """Load a whole-tensor optimizer state, sharding it like the parameters it belongs to."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(is_dtensor(p) for p in params):
        optimizer.load_state_dict(sd)
        return
    state = {}
    for idx, s in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {k: (shard_like(v, p) if isinstance(v, Tensor) and is_dtensor(p) and v.shape == p.shape else v)
                      for k, v in s.items()}
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def gathered_adapter(model: nn.Module, adapter_name: str | None = None):
    """A CPU AdapterGenerators with the full weights of the (possibly sharded) adapter; collective."""
    from iapt_fast.generator.bank import AdapterGenerators

    name = adapter_name if adapter_name is not None else model._require_active()
    adapter = model.generators[name]
    weights = {layer: {w: full_tensor(getattr(adapter[layer], w).detach()).cpu() for w in adapter[layer].names}
               for layer in adapter.layer_indices}
    return AdapterGenerators.from_weights(adapter.config, adapter.hidden_size, model.generators.num_layers, weights,
                                          backbone=adapter.backbone)


def save_adapter(model: nn.Module, directory: str | os.PathLike, ctx: DistContext | None = None,
                 adapter_name: str | None = None) -> None:
    """``model.save_pretrained(directory)`` for any strategy: gathered, rank 0 writes, atomically.

    Every rank must call it (FSDP gathers the shards). The files are committed together (see
    :mod:`iapt_fast.atomic`), so a reader never sees a half-written or mixed adapter. The result loads on one process with
    ``IAPTModel.from_pretrained(base, directory)``.
    """
    from iapt_fast.model.adapter_io import save_adapter as _save

    ctx = ctx or SINGLE_PROCESS
    sharded = any(is_dtensor(p) for p in model.parameters())
    adapter = gathered_adapter(model, adapter_name) if sharded else None
    if ctx.is_main:
        if adapter is not None:
            _save(adapter, directory)
        else:
            model.save_pretrained(directory, adapter_name=adapter_name)
    ctx.barrier()


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state gathered (collective under FSDP)."""
    sd = optimizer.state_dict()
    if not any(is_dtensor(p) for g in optimizer.param_groups for p in g["params"]):
        return sd
    state = {idx: {k: (full_tensor(v).cpu() if isinstance(v, Tensor) else v) for k, v in s.items()}
             for idx, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def ddp_wrap(model: nn.Module, ctx: DistContext, find_unused_parameters: bool) -> nn.Module:
    """``model`` in a DistributedDataParallel wrapper for its forward (the model stays the owner)."""
    from torch.nn.parallel import DistributedDataParallel

    # prepare_model already broadcast the trainable weights and the backbone is read from the
    # same file everywhere, so DDP's whole-model broadcast is skipped; buffers (rotary tables)
    # are the same on every rank: no per-forward buffer sync either.
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters, init_sync=False,
                                   **ddp_buffer_kwargs())

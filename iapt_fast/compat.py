"""Shims for the library releases iapt_fast runs on, in one place (design.md §6).

Supported: torch 2.11–2.13, triton 3.6–3.9, transformers 5.17–5.25. Each shim names the
releases it bridges; when support for the older release ends, the shim goes.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

__all__ = ["cache_kwarg_name", "ddp_buffer_kwargs", "distribute_tensor_from_local_copies", "decode_compile_config"]


def cache_kwarg_name(fn: Callable) -> str:
    """Name of the KV-cache argument of ``fn``: transformers 5.24 says ``cache``, 5.17 says
    ``past_key_values``."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def ddp_buffer_kwargs() -> dict[str, bool]:
    """DistributedDataParallel's switch for the per-forward buffer broadcast, off: torch 2.13
    calls it ``forward_sync_buffers``, 2.11 ``broadcast_buffers``."""
    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def distribute_tensor_from_local_copies(full: Any, mesh: Any, placements: Any) -> Any:
    """``distribute_tensor`` of a tensor every rank holds whole: each rank keeps its own shard
    (``src_data_rank=None``, newer torch); older torch scatters rank 0's copy (same result)."""
    from torch.distributed.tensor import distribute_tensor

    try:
        return distribute_tensor(full, mesh, placements, src_data_rank=None)
    except TypeError:
        return distribute_tensor(full, mesh, placements)


def decode_compile_config(device: Any, fullgraph: bool = True) -> Any:
    """The ``generate(compile_config=...)`` that compiles the decode step on ``device``.

    With a static cache, transformers compiles the decode step by itself on CUDA (and XPU,
    TPU...) in ``"reduce-overhead"`` mode, which captures CUDA graphs. Elsewhere it does not
    compile at all unless the config says to compile on every device (``_compile_all_devices``,
    the flag transformers 5.17–5.24 give their own CPU tests); there the mode is ``"default"``
    (CUDA graphs need CUDA). An ``IAPTModel.generate`` that may compile runs alone among
    concurrent calls (the compile gate of ``iapt_fast.model.iapt_model``).
    """
    import torch
    from transformers.generation import CompileConfig

    cuda = torch.device(device).type == "cuda"
    config = CompileConfig(fullgraph=fullgraph, mode="reduce-overhead" if cuda else "default")
    if not cuda:
        config._compile_all_devices = True
    return config

"""Saving and loading one IAPT adapter: adapter_config.json + adapter_model.safetensors.

Tensor names are ``layers.<l>.<w>`` for every target layer l and w in ``tensor_names(config)``,
with the per-adapter shapes of LayerGenerator (w_down [d, m], w_pool [m, T], rat_num [p+1],
rat_den [q], w_up [m, d]; anchored form: anchor [T, d], anchor_scale []), stored bit for bit
in the tensors' dtype. Files written before the anchored form existed hold no anchor; their
config has no ``generator_form`` and loads as the paper's form, exactly as before.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor

from iapt_fast.atomic import atomic_files
from iapt_fast.config import CONFIG_NAME, IAPTConfig
from iapt_fast.generator.bank import AdapterGenerators, tensor_names

__all__ = ["WEIGHTS_NAME", "save_adapter", "read_adapter", "expected_shapes", "build_adapter"]

WEIGHTS_NAME = "adapter_model.safetensors"


def expected_shapes(config: IAPTConfig, hidden_size: int, num_layers: int) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of an adapter with ``config`` on a backbone of that size."""
    d = hidden_size
    m = config.resolved_bottleneck(d)
    t = config.num_soft_tokens
    p, q = config.rational_degrees
    shapes = {}
    for layer in config.resolved_layers(num_layers):
        shapes.update({
            f"layers.{layer}.w_down": (d, m),
            f"layers.{layer}.w_pool": (m, t),
            f"layers.{layer}.rat_num": (p + 1,),
            f"layers.{layer}.rat_den": (q,),
            f"layers.{layer}.w_up": (m, d),
        })
        if config.anchored:
            shapes.update({f"layers.{layer}.anchor": (t, d), f"layers.{layer}.anchor_scale": ()})
    return shapes


def save_adapter(adapter: AdapterGenerators, directory: str | os.PathLike) -> None:
    """Write ``adapter`` to ``directory`` (created if missing), atomically.

    Both files are written in full into a temporary folder on the same file system and then
    renamed into place (see :func:`iapt_fast.atomic.atomic_files`): a crash or an error while
    saving leaves the adapter that was there before intact and loadable.
    """
    from safetensors.torch import save_file

    tensors = {}
    for layer in adapter.layer_indices:
        gen = adapter[layer]
        for w in gen.names:
            # Packed parameters are views into a shared stack; safetensors wants owners.
            tensors[f"layers.{layer}.{w}"] = getattr(gen, w).detach().to("cpu").contiguous().clone()
    # Weights first: a reader never sees a new config next to old weights of another shape.
    with atomic_files(directory, (WEIGHTS_NAME, CONFIG_NAME)) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt", "peft_type": "IAPT"})
        adapter.config.save_pretrained(tmp)


def read_adapter(directory: str | os.PathLike, hidden_size: int, num_layers: int) -> tuple[IAPTConfig, dict[str, Tensor]]:
    """Read and fully validate an adapter for a backbone of the given size.

    Raises:
        FileNotFoundError: the directory, its config or its weights file is missing.
        ValueError: the config or weights are corrupt or do not fit this backbone.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory {directory!r} does not exist")
    config = IAPTConfig.from_pretrained(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r} (next to {CONFIG_NAME})")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path!r} is not a readable safetensors file: {err}") from err
    try:
        expected = expected_shapes(config, hidden_size, num_layers)
    except ValueError as err:
        raise ValueError(f"adapter in {directory!r} does not fit this backbone: {err}") from err
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path!r} does not match its {CONFIG_NAME}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, shape in expected.items():
        value = tensors[key]
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{path!r}: {key} has shape {tuple(value.shape)}, expected {shape} for hidden size "
                f"{hidden_size} (was the adapter trained on another backbone?)"
            )
        if not value.dtype.is_floating_point:
            raise ValueError(f"{path!r}: {key} has dtype {value.dtype}, expected a float dtype")
        if not torch.isfinite(value).all():
            raise ValueError(f"{path!r}: {key} contains NaN or Inf")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    if len(dtypes) > 1:
        # The generator math runs one launch per adapter over weights of one dtype; a mix would
        # be accepted here and fail at every later forward (and could not share a serving pack).
        by_dtype = {d: next(k for k, t in tensors.items() if str(t.dtype).endswith(d)) for d in dtypes}
        raise ValueError(f"{path!r}: every tensor of an adapter must share one dtype, found {dtypes} "
                         f"(e.g. {', '.join(f'{k} is {d}' for d, k in by_dtype.items())})")
    return config, tensors


def build_adapter(config: IAPTConfig, tensors: dict[str, Tensor], hidden_size: int, num_layers: int,
                  device: Callable[[int], torch.device]) -> AdapterGenerators:
    """An AdapterGenerators holding exactly ``tensors`` (no random initialisation is paid).

    Args:
        device: layer index → device of that layer's generator.
    """
    weights = {
        layer: {w: tensors[f"layers.{layer}.{w}"].to(device(layer)) for w in tensor_names(config)}
        for layer in config.resolved_layers(num_layers)
    }
    return AdapterGenerators.from_weights(config, hidden_size, num_layers, weights)

"""Saving and loading one IAPT adapter: adapter_config.json + adapter_model.safetensors.

Tensor names are ``layers.<l>.<w>`` for every target layer l and w in ``tensor_names(config)``,
with the per-adapter shapes of LayerGenerator (w_down [d, m], w_pool [m, T], rat_num [p+1],
rat_den [q], w_up [m, d]; anchored form: anchor [T, d], anchor_scale []), stored bit for bit
in the tensors' dtype. Files written before the anchored form existed hold no anchor; their
config has no ``generator_form`` and loads as the paper's form, exactly as before.

adapter_config.json also records the backbone the adapter was made on (``"backbone"``: its
``model_type``, hidden size, layer count, vocabulary size, architecture class and checkpoint
name): its anchors and generators are that model's hidden states and read that model's
residual stream, so loading it into another family of the same size is refused unless the
caller says so. Files without the record load with a warning.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from iapt_fast.atomic import atomic_files, committed_file
from iapt_fast.config import CONFIG_NAME, IAPTConfig
from iapt_fast.generator.bank import AdapterGenerators, tensor_names

__all__ = ["WEIGHTS_NAME", "save_adapter", "read_adapter", "expected_shapes", "build_adapter", "backbone_record",
           "read_backbone_record", "saved_backbone_record", "check_backbone"]

WEIGHTS_NAME = "adapter_model.safetensors"
BACKBONE_KEY = "backbone"  # the record's key in adapter_config.json (IAPTConfig ignores it)
# The record's fields that must match for a load; the others are informational.
BACKBONE_CHECKED = ("model_type", "hidden_size", "num_layers")


def backbone_record(model_config: Any, num_layers: int) -> dict[str, Any]:
    """What identifies a backbone, from its transformers config: ``model_type``,
    ``hidden_size``, ``num_layers`` (its decoder layers) are checked at load;
    ``vocab_size``, ``architectures`` and ``name_or_path`` are informational."""
    architectures = getattr(model_config, "architectures", None) or []
    return {
        "model_type": str(getattr(model_config, "model_type", None)),
        "hidden_size": int(model_config.hidden_size),
        "num_layers": int(num_layers),
        "vocab_size": getattr(model_config, "vocab_size", None),
        "architectures": [str(a) for a in architectures],
        "name_or_path": getattr(model_config, "_name_or_path", None) or None,
    }


def read_backbone_record(config_path: str) -> dict[str, Any] | None:
    """The backbone record of an adapter_config.json (None: saved without one), validated."""
    with open(config_path, encoding="utf-8") as fh:
        record = json.load(fh).get(BACKBONE_KEY)
    if record is None:
        return None
    if not isinstance(record, dict):
        raise ValueError(f"{config_path!r}: {BACKBONE_KEY} must be an object, got {record!r}")
    for key, kind, what in (("model_type", str, "a string"), ("hidden_size", int, "an integer"),
                            ("num_layers", int, "an integer")):
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{config_path!r}: {BACKBONE_KEY}.{key} must be {what}, got {value!r}")
    return record


def saved_backbone_record(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The backbone record saved in adapter folder ``directory`` (None: none was saved)."""
    return read_backbone_record(committed_file(os.fspath(directory), CONFIG_NAME))


def _describe(record: dict[str, Any]) -> str:
    name = f" {record['name_or_path']!r}" if isinstance(record.get("name_or_path"), str) else ""
    return (f"{record['model_type']}{name} (hidden size {record['hidden_size']}, "
            f"{record['num_layers']} layers)")


def check_backbone(recorded: dict[str, Any] | None, current: dict[str, Any], where: str,
                   allow_other_backbone: bool = False) -> None:
    """Refuse an adapter recorded for another backbone than ``current`` (see
    :data:`BACKBONE_CHECKED`), unless ``allow_other_backbone``; warn for one without a record."""
    if recorded is None:
        warnings.warn(f"adapter {where} does not record the backbone it was made on (saved by an older "
                      f"iapt_fast): it is loaded into this {_describe(current)} unchecked; save it again to "
                      "record the backbone", UserWarning, stacklevel=3)
        return
    differ = [k for k in BACKBONE_CHECKED if recorded.get(k) != current.get(k)]
    if differ and not allow_other_backbone:
        # Another hidden size cannot fit the weights' shapes: there the override would not help.
        override = "" if "hidden_size" in differ else ", or pass allow_other_backbone=True to load it anyway"
        raise ValueError(f"adapter {where} was made on a {_describe(recorded)}, this backbone is a "
                         f"{_describe(current)} (different {', '.join(differ)}): its anchors and generators "
                         f"are another model's hidden states. Load it into its own backbone{override}")


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

    Both files are written in full and flushed before either replaces an old one, and they are
    committed together (see :mod:`iapt_fast.atomic`): an error while saving leaves the adapter
    that was there before; a crash at any point leaves the old or the new adapter, complete,
    for :func:`read_adapter`, in an adapter folder and in a run folder alike.
    """
    from safetensors.torch import save_file

    tensors = {}
    for layer in adapter.layer_indices:
        gen = adapter[layer]
        for w in gen.names:
            # Packed parameters are views into a shared stack; safetensors wants owners.
            tensors[f"layers.{layer}.{w}"] = getattr(gen, w).detach().to("cpu").contiguous().clone()
    with atomic_files(directory, (WEIGHTS_NAME, CONFIG_NAME)) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt", "peft_type": "IAPT"})
        # One plain write: the stage is flushed and committed as a whole by atomic_files.
        records = {} if adapter.backbone is None else {BACKBONE_KEY: adapter.backbone}
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as fh:
            fh.write(adapter.config.to_json_string(**records))


def read_adapter(directory: str | os.PathLike, hidden_size: int, num_layers: int, *,
                 backbone: dict[str, Any] | None = None,
                 allow_other_backbone: bool = False) -> tuple[IAPTConfig, dict[str, Tensor]]:
    """Read and fully validate an adapter for a backbone of the given size.

    ``backbone`` (a :func:`backbone_record`) is checked against the file's record, see
    :func:`check_backbone`; None skips that check.

    Raises:
        FileNotFoundError: the directory, its config or its weights file is missing.
        ValueError: the config or weights are corrupt or do not fit this backbone.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory {directory!r} does not exist{_interrupted_save_hint(directory)}")
    # A save that a crash interrupted after its commit point is read as the new adapter.
    config_path = committed_file(directory, CONFIG_NAME)
    config = IAPTConfig.from_pretrained(os.path.dirname(config_path))
    if backbone is not None:
        check_backbone(read_backbone_record(config_path), backbone, repr(directory), allow_other_backbone)
    path = committed_file(directory, WEIGHTS_NAME)
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


def _interrupted_save_hint(directory: str) -> str:
    """Names a moved-aside copy (``.name.old-*``): what a writer that moved the old folder
    aside and died before renaming the new one in leaves of the adapter."""
    parent, name = os.path.split(os.path.abspath(directory))
    try:
        aside = sorted(e for e in os.listdir(parent) if e.startswith(f".{name}.old-"))
    except OSError:
        return ""
    if not aside:
        return ""
    return (f" (an interrupted save moved the previous adapter to {os.path.join(parent, aside[-1])!r}: "
            "rename it back to load it)")


def build_adapter(config: IAPTConfig, tensors: dict[str, Tensor], hidden_size: int, num_layers: int,
                  device: Callable[[int], torch.device], backbone: dict[str, Any] | None = None) -> AdapterGenerators:
    """An AdapterGenerators holding exactly ``tensors`` (no random initialisation is paid).

    Args:
        device: layer index → device of that layer's generator.
        backbone: the record of the backbone the adapter was made on (saved with it).
    """
    weights = {
        layer: {w: tensors[f"layers.{layer}.{w}"].to(device(layer)) for w in tensor_names(config)}
        for layer in config.resolved_layers(num_layers)
    }
    return AdapterGenerators.from_weights(config, hidden_size, num_layers, weights, backbone=backbone)

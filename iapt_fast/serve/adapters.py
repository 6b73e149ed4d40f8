"""The adapters one served backbone carries: read from their folders, checked, packed.

Both sides of the engine use this: the front end checks the adapters at start (a misfit is
refused naming it, before the engine starts) and learns each one's T; the model inside the
engine holds the generator weights, stacked per shape group exactly as ``IAPTModel`` serves them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from iapt_fast.config import IAPTConfig
from iapt_fast.generator.bank import AdapterGenerators, AdapterPack, build_packs, check_adapter_name
from iapt_fast.model.adapter_io import build_adapter, read_adapter
from iapt_fast.model.call_state import BASE_ADAPTER

__all__ = ["AdapterSpec", "ServedAdapters", "SERVED_FAMILIES", "parse_adapter_spec"]

# Families whose vLLM decoder loop this package drives (model_type → served architecture).
SERVED_FAMILIES = {
    "llama": "IAPTLlamaForCausalLM",
    "mistral": "IAPTMistralForCausalLM",
    "qwen2": "IAPTQwen2ForCausalLM",
    "qwen3": "IAPTQwen3ForCausalLM",
}


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to serve: the name requests use and its folder (adapter_config.json +
    adapter_model.safetensors)."""

    name: str
    path: str


def parse_adapter_spec(text: str) -> AdapterSpec:
    """``NAME=DIR`` (the form of ``--adapter``) → AdapterSpec."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--adapter expects NAME=ADAPTER_DIR, got {text!r}")
    return AdapterSpec(name, os.path.abspath(path))


@dataclass(frozen=True)
class Slot:
    """Where adapter slot k lives: its pack and its index in that pack's stacks."""

    name: str
    pack: AdapterPack
    index: int
    num_tokens: int


class ServedAdapters:
    """Adapters in slot order (the order given), validated against one backbone.

    Args:
        specs: the adapters; slot k is ``specs[k]``.
        family: the backbone's ``model_type``.
        hidden_size, num_layers: of the backbone.
        device: where the generator weights live (the model's device).
        base_name: the name requests use for the bare backbone (no adapter may take it).
    Raises:
        ValueError naming the adapter that does not fit (shape, family, partial target_layers).
    """

    def __init__(self, specs: list[AdapterSpec], family: str, hidden_size: int, num_layers: int,
                 device: torch.device | str = "cpu", base_name: str | None = None) -> None:
        if family not in SERVED_FAMILIES:
            raise ValueError(f"serving IAPT adapters in vLLM supports the families {sorted(SERVED_FAMILIES)}; "
                             f"this backbone is {family!r}")
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must be unique, got {names}")
        device = torch.device(device)
        adapters: dict[str, AdapterGenerators] = {}
        self.configs: dict[str, IAPTConfig] = {}
        for spec in specs:
            if spec.name in (BASE_ADAPTER, base_name):
                raise ValueError(f"adapter name {spec.name!r} is reserved for the bare backbone")
            check_adapter_name(spec.name)
            try:
                config, tensors = read_adapter(spec.path, hidden_size, num_layers)
            except (OSError, ValueError) as err:
                raise ValueError(f"adapter {spec.name!r} ({spec.path}) does not fit this backbone: {err}") from err
            if config.resolved_layers(num_layers) != list(range(num_layers)):
                # Layers without a generator would still see the T placeholder rows' keys and
                # values, which the HF path hides there: the results would differ.
                raise ValueError(f"adapter {spec.name!r} ({spec.path}) has target_layers={config.target_layers}; "
                                 "serving in vLLM needs a generator at every layer (target_layers=None)")
            self.configs[spec.name] = config
            adapters[spec.name] = build_adapter(config, tensors, hidden_size, num_layers, lambda _: device)
        for adapter in adapters.values():
            adapter.requires_grad_(False)
        packs = build_packs(adapters) if adapters else {}
        where = {name: (pack, pack.index[name]) for pack in packs.values() for name in pack.names}
        self.slots = [Slot(name, where[name][0], where[name][1], self.configs[name].num_soft_tokens)
                      for name in names]
        self.names = names
        self._adapters = adapters  # keeps the packed tensors' owners alive

    def __len__(self) -> int:
        return len(self.slots)

    def slot_of(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown adapter {name!r}; served adapters: {self.names}") from None

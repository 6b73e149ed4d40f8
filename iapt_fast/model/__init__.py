"""IAPT on Hugging Face causal LMs: the ``IAPTModel`` front and what it is made of.

    iapt_model.py      IAPTModel / get_iapt_model: adapters, save/load, forward, generate
    requests.py        validating one call and planning its generator launches
    iapt_cache.py      the carrier of a call: IAPTCache (KV cache + Request / PrefillState)
    prefix_hooks.py    the hooks that put the soft tokens into the KV cache
    architectures/     one class per model family
    packing.py         serving packs: same-shape adapters stacked once
    compile_gate.py    a generate() that compiles its decode step runs alone among threads
    adapter_io.py      adapter_config.json + adapter_model.safetensors
    anchor.py          the anchored form's start: hidden states of an init sequence
"""
from iapt_fast.model.iapt_model import BASE_ADAPTER, VERIFIED_ATTENTION, IAPTModel, get_iapt_model

__all__ = ["IAPTModel", "get_iapt_model", "BASE_ADAPTER", "VERIFIED_ATTENTION"]

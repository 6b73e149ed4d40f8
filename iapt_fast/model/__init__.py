"""IAPT on Hugging Face causal LMs: the ``IAPTModel`` front and what it is made of.

    iapt_model.py      IAPTModel / get_iapt_model: adapters, save/load, forward, generate; the
                       compile gate (a generate() that compiles its decode step runs alone)
    call_state.py      one call: validated into a Request, planned into launches, carried by
                       the IAPTCache the backbone is called with
    prefix_hooks.py    the hooks that put the soft tokens into the KV cache
    architectures.py   one class per model family: where the soft tokens enter a layer
    adapter_io.py      adapter_config.json + adapter_model.safetensors
    anchor.py          the anchored form's start: hidden states of an init sequence
"""
from iapt_fast.model.call_state import IAPTCache
from iapt_fast.model.iapt_model import BASE_ADAPTER, VERIFIED_ATTENTION, IAPTModel, get_iapt_model

__all__ = ["IAPTModel", "get_iapt_model", "IAPTCache", "BASE_ADAPTER", "VERIFIED_ATTENTION"]

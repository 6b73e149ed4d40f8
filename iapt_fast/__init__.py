"""iapt_fast: Instruction-Aware Prompt Tuning (Zhu et al., ACL 2024) for Hugging Face causal LMs.

The public entry points:
    IAPTConfig                         adapter hyper-parameters (config.py)
    prompt_generator                   the generator math, reference or Triton (generator/functional.py)
    rational, Rational, fit_rational   the learned rational activation (generator/rational.py)
    GeneratorBank                      generator parameters of all layers × adapters (generator/bank.py)
    IAPTModel, get_iapt_model          a causal LM with IAPT adapters (model/)
    IAPTCache                          the cache an IAPT call returns (model/call_state.py)
    training/                          Trainer, data, checkpoints, DDP/FSDP; the CLI is iapt_fast.train
"""
from iapt_fast.config import IAPTConfig
from iapt_fast.generator import (AdapterGenerators, GeneratorBank, LayerGenerator, Rational, fit_rational,
                                 prompt_generator, rational)
from iapt_fast.model import IAPTCache, IAPTModel, get_iapt_model

__version__ = "0.1.0"

__all__ = [
    "IAPTConfig",
    "prompt_generator",
    "rational",
    "Rational",
    "fit_rational",
    "GeneratorBank",
    "AdapterGenerators",
    "LayerGenerator",
    "IAPTModel",
    "get_iapt_model",
    "IAPTCache",
]

"""iapt_fast: Instruction-Aware Prompt Tuning (Zhu et al., ACL 2024) for Hugging Face causal LMs.

The public entry points:
    IAPTConfig                     adapter hyper-parameters (config.py)
    prompt_generator               the generator math, reference or Triton (functional.py)
    rational, Rational, fit_rational   the learned rational activation (rational.py)
    GeneratorBank                  generator parameters of all layers × adapters (generator.py)
"""
from .config import IAPTConfig
from .functional import prompt_generator
from .generator import AdapterGenerators, GeneratorBank, LayerGenerator
from .rational import Rational, fit_rational, rational

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
]
from .model import IAPTModel, get_iapt_model  # noqa: E402  (after the core: model imports it)

__all__ += ["IAPTModel", "get_iapt_model"]

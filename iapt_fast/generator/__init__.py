"""The generator math: the rational activation, the PyTorch reference (the oracle and the CPU
path), ``prompt_generator`` (validation and dispatch to the reference or the Triton kernels of
``iapt_fast.kernels``) and the generator parameters of every adapter × layer."""
from iapt_fast.generator.bank import AdapterGenerators, GeneratorBank, LayerGenerator
from iapt_fast.generator.functional import prompt_generator
from iapt_fast.generator.rational import Rational, fit_rational, rational

__all__ = ["prompt_generator", "rational", "Rational", "fit_rational", "GeneratorBank", "AdapterGenerators",
           "LayerGenerator"]

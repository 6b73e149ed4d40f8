"""Benchmark suites run by benchmarks/run.py, one module each, all on one protocol (:class:`Suite`):

    kernels   the prompt generator alone
    e2e       multi-tenant greedy generation
    compiled  static KV cache, decode step compiled by generate()
    train     one training step
    serve     vLLM serving (its own environment)
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

__all__ = ["SUITES", "SuiteOptions", "Suite", "suite_module"]

# Every suite, in the order a run measures them.
SUITES = ("kernels", "e2e", "compiled", "train", "serve")


@dataclass(frozen=True)
class SuiteOptions:
    """What a run asks of every suite (benchmarks/run.py's options).

    Attributes:
        device: "cpu" or "cuda".
        quick: tiny shapes (a smoke run).
        methods: the e2e suite's methods.
        lora_targets: LoRA target modules (rank matched to IAPT's parameter count).
    """

    device: str
    quick: bool
    methods: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")


class Suite(Protocol):
    """What a suite module defines: how many cases it will measure, the measuring itself (rows
    into the Recorder, its settings returned), and the headline ratios with their targets it
    declares over the rows (suites/ratios.py)."""

    def count(self, opts: SuiteOptions) -> int: ...

    def run(self, rec: Any, opts: SuiteOptions) -> dict[str, Any]: ...

    def ratios(self, rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]: ...


def suite_module(name: str) -> ModuleType:
    """The module of suite ``name`` (one of :data:`SUITES`), imported on first use."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from {SUITES}")
    return importlib.import_module(f"suites.{name}")

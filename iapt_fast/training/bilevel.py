"""The paper's bi-level split of the generator parameters (design.md §1).

IAPT trains the rational activations' coefficients like DARTS architecture parameters: on a
held-out dev split, with their own tiny learning rate, alternating with the ordinary weights
(W_down, W_pool, W_up) trained on the train split. First order: the dev step differentiates
the dev loss at the current weights (ξ = 0 in DARTS), no unrolled second-order term.

This module only decides which parameter is which and isolates one side's gradients; the
loop lives in iapt_fast/training/trainer.py.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["RATIONAL_PARAMETER_KEYS", "is_rational_parameter", "is_anchor_parameter", "is_pool_parameter", "split_parameters", "grad_only_for"]

# Parameter-name fragments of the rational coefficients (see iapt_fast/generator/bank.py).
RATIONAL_PARAMETER_KEYS = ("rat_num", "rat_den")


def is_rational_parameter(name: str) -> bool:
    """True for the coefficients of a rational activation (the 'architecture' side)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in RATIONAL_PARAMETER_KEYS


def is_anchor_parameter(name: str) -> bool:
    """True for an anchor B_l of the anchored form (trained with the weights, at ``anchor_lr``)."""
    return name.rsplit(".", 1)[-1] == "anchor"


def is_pool_parameter(name: str) -> bool:
    """True for a pooling matrix W_pool (trained with the weights, at lr × ``pool_lr_scale``)."""
    return name.rsplit(".", 1)[-1] == "w_pool"


def split_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Trainable parameters of ``model`` as (weights, rationals), each a list of (name, param).

    Weights are trained on the train split, rationals on the dev split. Frozen parameters
    (the backbone) are in neither list.
    """
    weights, rationals = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (rationals if is_rational_parameter(name) else weights).append((name, param))
    return weights, rationals


@contextlib.contextmanager
def grad_only_for(active: list[nn.Parameter], frozen: list[nn.Parameter]) -> Iterator[None]:
    """Within the block, ``frozen`` parameters do not require grad (restored afterwards).

    The dev step then skips the weight-gradient matmuls it would throw away, and a step can
    never leave a stale gradient on the other side's parameters.
    """
    saved = [p.requires_grad for p in frozen]
    try:
        for p in frozen:
            p.requires_grad_(False)
        for p in active:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(frozen, saved):
            p.requires_grad_(flag)

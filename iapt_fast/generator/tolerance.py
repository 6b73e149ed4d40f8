"""The correctness rule every implementation of the generator is held to (design.md §4).

flash-attention's rule: with out_ref the reference in float64 (or float32) and out_pt the
reference run in the test dtype, ``max|out − out_ref| ≤ 2·max|out_pt − out_ref| + atol`` — an
implementation may be at most twice as far from the truth as the reference itself is in that
dtype. Used by the tests (outputs and every gradient) and by the benchmarks (never time
wrong code).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ATOL", "rule_error", "assert_close_by_rule"]

# atol per test dtype: the slack on top of twice the reference's own rounding error.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def rule_error(out: Tensor, out_ref: Tensor, out_pt: Tensor, atol: float | None = None) -> tuple[float, float]:
    """(max|out − out_ref|, the rule's bound 2·max|out_pt − out_ref| + atol), in float64."""
    if atol is None:
        atol = ATOL.get(out.dtype, 1e-5)
    out64, ref64, pt64 = (t.detach().double().cpu() for t in (out, out_ref, out_pt))
    err = (out64 - ref64).abs().max().item() if out64.numel() else 0.0
    bound = 2 * ((pt64 - ref64).abs().max().item() if pt64.numel() else 0.0) + atol
    return err, bound


def assert_close_by_rule(out: Tensor, out_ref: Tensor, out_pt: Tensor, name: str = "output",
                         atol: float | None = None) -> None:
    """Raise AssertionError unless ``out`` is finite, shaped like ``out_ref`` and within the rule."""
    assert tuple(out.shape) == tuple(out_ref.shape), f"{name}: shape {tuple(out.shape)} != {tuple(out_ref.shape)}"
    assert torch.isfinite(out.detach()).all(), f"{name}: non-finite values"
    err, bound = rule_error(out, out_ref, out_pt, atol)
    assert err <= bound, f"{name}: max error {err:.3e} exceeds 2×(reference error) + atol = {bound:.3e}"

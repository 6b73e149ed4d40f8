"""Shared test utilities: the flash-attention tolerance rule (design.md §4) and random inputs."""
from __future__ import annotations

import torch
from torch import Tensor

# atol per test dtype: the slack on top of twice the reference's own rounding error.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def assert_close_by_rule(out: Tensor, out_ref: Tensor, out_pt: Tensor, name: str = "output",
                         atol: float | None = None) -> None:
    """max|out − out_ref| ≤ 2·max|out_pt − out_ref| + atol.

    out: the implementation under test (in the test dtype); out_ref: the reference in float64
    (float32 on GPU); out_pt: the reference run in the test dtype.
    """
    if atol is None:
        atol = ATOL.get(out.dtype, 1e-5)
    out64, ref64, pt64 = (t.detach().double().cpu() for t in (out, out_ref, out_pt))
    assert out64.shape == ref64.shape, f"{name}: shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out64).all(), f"{name}: non-finite values"
    err = (out64 - ref64).abs().max().item() if out64.numel() else 0.0
    bound = 2 * ((pt64 - ref64).abs().max().item() if pt64.numel() else 0.0) + atol
    assert err <= bound, f"{name}: max error {err:.3e} exceeds 2×(reference error) + atol = {bound:.3e}"

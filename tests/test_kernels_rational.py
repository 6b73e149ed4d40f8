"""The Triton rational helpers (kernels/rational_tl.py) on inputs from 1e-3 to 1e30 of both signs.

One program per input point, so every coefficient gradient is per point as well. Value,
dR/dx and every coefficient gradient are held to the design.md §4 rule against the exact
value (tests/rational_oracle.py, rounded to float64), with the float32 PyTorch reference
(iapt_fast.generator.rational and its autograd) as the reference in the test dtype, decade
by decade of |x|.
"""
import pytest
import torch
import triton
import triton.language as tl

from iapt_fast import fit_rational
from iapt_fast.generator import functional
from iapt_fast.kernels.rational_tl import rat_coef_grads_atomic, rat_dx, rat_forward
from kernels_cases import device, rule
from rational_oracle import autograd_per_point, decades, exact_batch, fresh_seed, random_coefficients, wide_inputs

pytestmark = pytest.mark.skipif(not functional.triton_available(), reason="triton not importable")


@triton.jit
def _probe_kernel(x_ptr, r_ptr, dx_ptr, num_ptr, den_ptr, dnum_ptr, dden_ptr,
                  P1: tl.constexpr, Q: tl.constexpr, VERSION_B: tl.constexpr):
    # A 16×16 tile whose lane (0, 0) holds this program's point; the other lanes hold 0 with
    # g = 0, as masked lanes do in rat_bwd_kernel, and must add nothing to the gradients.
    pid = tl.program_id(0)
    lane = tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
    first = lane == 0
    x = tl.load(x_ptr + pid + lane * 0, mask=first, other=0.0)
    g = tl.where(first, 1.0, 0.0)
    r = rat_forward(x, num_ptr, den_ptr, P1, Q, VERSION_B)
    dx, f, dh, sh = rat_dx(x, num_ptr, den_ptr, P1, Q, VERSION_B)
    rat_coef_grads_atomic(x, g, f, dh, sh, den_ptr, dnum_ptr + pid * P1, dden_ptr + pid * Q, P1, Q, VERSION_B)
    tl.store(r_ptr + pid + lane * 0, r, mask=first)
    tl.store(dx_ptr + pid + lane * 0, dx, mask=first)


def _triton(x, a, b, version):
    """(R, dR/dx, dR/da [n, p+1], dR/db [n, q]) per point from the Triton helpers, on the CPU."""
    dev = device()
    n, p1, q = x.numel(), a.numel(), b.numel()
    r, dx = (torch.full((n,), float("nan"), device=dev) for _ in range(2))
    dnum, dden = torch.zeros(n, p1, device=dev), torch.zeros(n, q, device=dev)
    _probe_kernel[(n,)](x.to(dev), r, dx, a.to(dev), b.to(dev), dnum, dden, P1=p1, Q=q, VERSION_B=version == "B")
    return tuple(t.cpu() for t in (r, dx, dnum, dden))


@pytest.mark.parametrize("version", ["A", "B"])
@pytest.mark.parametrize("degrees", [(6, 5), (3, 3), (2, 4), (0, 1), "gelu"])
def test_triton_rational_wide_range_matches_exact(version, degrees):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    x = wide_inputs(64, gen)
    if degrees == "gelu":  # version A's fit has b_5 ≈ -1e-13: the scaled denominator is tiny
        a, b, _ = fit_rational("gelu", (6, 5), version)
    else:
        a, b = random_coefficients(*degrees, gen)
    got = _triton(x, a, b, version)
    want = exact_batch(x, a, b, version)
    pt = autograd_per_point(x, a, b, version)
    fmax = torch.finfo(torch.float32).max
    for name, g, ref, ref_pt in zip(("R", "dR/dx", "dR/da", "dR/db"), got, want, pt):
        # Where the true value is beyond float32 (R of the version-A fit above ~1e28), R is ±inf.
        fits = (ref.abs() <= fmax).reshape(x.numel(), -1).all(1)
        if name == "R":
            assert torch.equal(g[~fits], ref[~fits].float()), f"R: not ±inf where it overflows [seed={seed}]"
        for band in decades(x):
            band = band & fits
            if band.any():
                tag = f"{name} {version}{degrees} |x| in [{x[band].abs().min():.1e}, {x[band].abs().max():.1e}] [seed={seed}]"
                rule(g[band], ref[band], ref_pt[band], tag)


def test_triton_rational_fitted_gelu_saturates_linearly():
    # The default (6, 5) GELU fit: R(x) → (a_6/|b_5|)·|x| (x^6/|x|^5 = |x|), finite up to float32's range.
    a, b, _ = fit_rational("gelu")
    x = torch.tensor([1e6, 1e7, 1e10, 1e20, 1e30, -1e30, 1e36])
    r, dx, dnum, dden = _triton(x, a, b, "B")
    torch.testing.assert_close(r.double(), exact_batch(x, a, b, "B")[0], rtol=1e-5, atol=0)
    slope = (a[6] / b[4].abs()).double()
    torch.testing.assert_close(r[3:].double() / x[3:].double().abs(), slope.expand(4), rtol=1e-5, atol=0)
    # dR/db_5 ≈ −R/|b_5| is beyond float32 at 1e36 (the true value overflows); up to 1e30 all is finite.
    for got in (dx, dnum, dden):
        assert torch.isfinite(got[:6]).all()

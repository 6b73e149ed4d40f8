"""The rational activation: formula, gradients, fitting, safety."""
import math

import pytest
import torch

from iapt_fast import Rational, fit_rational
from iapt_fast.generator import rational
from iapt_fast.generator.rational import named_activation
from rational_oracle import autograd_per_point, exact_batch, fresh_seed, random_coefficients, wide_inputs


def _formula64(x, a, b, version):
    """The formula term by term in float64, written independently of the Horner code."""
    x = x.double()
    a = a.double()
    b = b.double()
    numer = sum(a[i] * x**i for i in range(a.numel()))
    if version == "B":
        denom = 1 + (sum(b[j] * x ** (j + 1) for j in range(b.numel()))).abs()
    else:
        denom = 1 + sum((b[j] * x ** (j + 1)).abs() for j in range(b.numel()))
    return numer / denom


@pytest.mark.parametrize("version", ["A", "B"])
@pytest.mark.parametrize("degrees", [(6, 5), (3, 2), (0, 1), (5, 7)])
def test_matches_float64_formula(version, degrees):
    p, q = degrees
    x = torch.randn(257) * 2
    a = torch.randn(p + 1)
    b = torch.randn(q)
    expected = _formula64(x, a, b, version)
    out64 = rational(x.double(), a.double(), b.double(), version)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, expected, rtol=1e-12, atol=1e-12)
    out = rational(x, a, b, version)
    assert out.dtype == torch.float32
    # float32 Horner vs the float64 sum: only float32 rounding, relative to the terms' size.
    scale = sum(a[i].abs().double() * x.double().abs() ** i for i in range(p + 1))
    assert ((out.double() - expected).abs() <= 1e-5 * (scale + 1)).all()


@pytest.mark.parametrize("version", ["A", "B"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(version, dtype):
    x = (torch.randn(300) * 2).to(dtype)
    a, b = torch.randn(7), torch.randn(5)
    out = rational(x, a, b, version)
    assert out.dtype == dtype
    # Computed in float32 and rounded once: identical to the float32 path, then cast.
    torch.testing.assert_close(out, rational(x.float(), a, b, version).to(dtype), rtol=0, atol=0)
    expected = _formula64(x.double(), a, b, version)
    ulp = torch.finfo(dtype).eps * expected.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((out.double() - expected).abs() <= ulp + 1e-6).all()


@pytest.mark.parametrize("version", ["A", "B"])
def test_gradcheck(version):
    x = torch.randn(9, dtype=torch.float64, requires_grad=True)
    a = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: rational(x, a, b, version), (x, a, b))


@pytest.mark.parametrize("version", ["A", "B"])
def test_broadcast_coefficients_per_row(version):
    x = torch.randn(3, 4, 5)
    a = torch.randn(3, 7)
    b = torch.randn(3, 5)
    out = rational(x, a[:, None, None, :], b[:, None, None, :], version)
    for r in range(3):
        torch.testing.assert_close(out[r], rational(x[r], a[r], b[r], version))


@pytest.mark.parametrize(
    "name,bound", [("gelu", 1e-3), ("silu", 1e-3), ("tanh", 1e-3), ("identity", 1e-6), ("relu", 6e-2)]
)
@pytest.mark.parametrize("version", ["A", "B"])
def test_fit_reaches_target(name, bound, version):
    num, den, err = fit_rational(name, (6, 5), version, (-3.0, 3.0))
    assert num.shape == (7,) and den.shape == (5,)
    assert err <= bound
    # The reported error is honest: recompute it on a fresh grid here.
    x = torch.linspace(-3, 3, 7919, dtype=torch.float64)
    actual = (rational(x, num.double(), den.double(), version) - named_activation(name)(x)).abs().max().item()
    assert actual <= bound
    assert abs(actual - err) <= max(0.1 * err, 1e-6)


def test_fit_callable_and_errors():
    num, den, err = fit_rational(lambda t: torch.sin(t), (6, 5), "B", (-2.0, 2.0))
    assert err < 1e-3
    with pytest.raises(ValueError, match="unknown activation"):
        fit_rational("swishy")
    with pytest.raises(ValueError, match="fn must"):
        fit_rational(lambda t: t[:3])
    with pytest.raises(ValueError, match="version"):
        rational(torch.zeros(2), torch.ones(2), torch.ones(1), version="C")


@pytest.mark.parametrize("version", ["A", "B"])
@pytest.mark.parametrize("name", ["gelu", "relu", "silu", "tanh", "identity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_no_nan_or_inf_up_to_1e4(version, name, dtype):
    num, den, _ = fit_rational(name, (6, 5), version)
    x = torch.cat([torch.linspace(-1e4, 1e4, 2001), torch.tensor([-1e4, 0.0, 1e4])]).to(dtype)
    out = rational(x, num, den, version)
    assert torch.isfinite(out).all()
    x32 = x.float().requires_grad_(True)
    rational(x32, num, den, version).sum().backward()
    assert torch.isfinite(x32.grad).all()


def test_denominator_at_least_one():
    # With q-degree terms only, |R(x)| <= |P(x)| everywhere: the denominator never shrinks it.
    for version in "AB":
        x = torch.randn(1000, dtype=torch.float64) * 10
        a = torch.randn(7, dtype=torch.float64)
        b = torch.randn(5, dtype=torch.float64)
        numer = sum(a[i] * x**i for i in range(7))
        assert (rational(x, a, b, version).abs() <= numer.abs() * (1 + 1e-12)).all()


def test_module_trains_and_repr():
    act = Rational(init="silu")
    assert act.fit_error < 1e-3
    x = torch.randn(64)
    torch.testing.assert_close(act(x), torch.nn.functional.silu(x), atol=2e-3, rtol=0)
    act(x).pow(2).sum().backward()
    assert act.numerator.grad.abs().sum() > 0 and act.denominator.grad.abs().sum() > 0
    assert "fit_error" in repr(act)
    assert math.isfinite(act.fit_error)


# ---------------------------------------------------------------------------- wide range
def _rounding_scales(x, a, b, version, r, dx):
    """Forward-error scales of R, dR/dx, dR/da_i, dR/db_j: each quantity with every term taken
    in absolute value (what float rounding is proportional to, whatever the evaluation order)."""
    x, a, b, r, dx = (t.double() for t in (x, a, b, r, dx))
    ax = x.abs()[:, None]
    i = torch.arange(a.numel(), dtype=torch.float64)
    j = torch.arange(1, b.numel() + 1, dtype=torch.float64)
    num_abs = (a.abs() * ax**i).sum(1)
    den_abs = (b.abs() * ax**j).sum(1)
    dnum_abs = (i[1:] * a[1:].abs() * ax ** (i[1:] - 1)).sum(1)
    dden_abs = (j * b.abs() * ax ** (j - 1)).sum(1)
    if version == "B":
        denom = 1 + (b * x[:, None] ** j).sum(1).abs()
    else:
        denom = 1 + den_abs
    s_r = (num_abs + r.abs() * den_abs) / denom
    s_dx = (dnum_abs + (r.abs() + s_r) * dden_abs + dx.abs() * den_abs) / denom
    growth = (1 + den_abs / denom)[:, None]
    s_da = ax**i / denom[:, None] * growth
    s_db = ax**j / denom[:, None] * (s_r[:, None] + r.abs()[:, None] * growth)
    return s_r, s_dx, s_da, s_db


DEGREES = [(6, 5), (3, 2), (0, 1), (5, 7), (2, 2)]


@pytest.mark.parametrize("version", ["A", "B"])
@pytest.mark.parametrize("degrees", DEGREES + ["gelu"])
def test_wide_range_matches_exact(version, degrees):
    """|x| from 1e-3 to 1e30, both signs: R and every gradient are finite and as accurate as the
    float rounding of their terms allows, in float64 and in float32 (design.md §1)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    if degrees == "gelu":
        a, b, _ = fit_rational("gelu", (6, 5), version)
    else:
        a, b = random_coefficients(*degrees, gen)
    p, q = a.numel() - 1, b.numel()
    x = wide_inputs(200, gen)
    want = exact_batch(x, a, b, version)
    for dtype, factor in ((torch.float64, 4.0), (torch.float32, 4.0)):
        got = autograd_per_point(x.to(dtype), a.to(dtype), b.to(dtype), version)
        scales = _rounding_scales(x, a, b, version, want[0], want[1])
        bound_unit = factor * (p + q + 2) * torch.finfo(dtype).eps
        for name, g, w, s in zip(("R", "dR/dx", "dR/da", "dR/db"), got, want, scales):
            where = f"{name} {dtype} {version}{(p, q)} [seed={seed}]"
            assert g.dtype == dtype
            # Finite wherever the true value is (a fit can make R itself exceed float32: GELU's
            # version-A fit has b_5 ≈ -1e-13, so R ≈ 2e10·|x|); beyond, R is ±inf of the right sign.
            fits = w.abs() <= torch.finfo(dtype).max
            assert torch.isfinite(g[fits]).all(), f"{where}: non-finite at x = {x[(fits & ~torch.isfinite(g)).reshape(x.numel(), -1).any(1)]}"
            if name == "R":
                assert torch.equal(g[~fits], w[~fits].to(dtype)), f"{where}: not ±inf where R overflows"
            # Below the dtype's smallest normal number a result may underflow: absolute slack there.
            g, w, s = g[fits], w[fits], s[fits]
            ratio = ((g.double() - w).abs() / (bound_unit * s + torch.finfo(dtype).tiny)).max().item()
            assert ratio <= 1.0, f"{where}: error {ratio:.2f}× the rounding bound"


def test_issue_inputs_saturate_linearly():
    # The default GELU fit: x^6/|x|^5 = |x|, so R(x) → (a_6/|b_5|)·|x| as |x| grows.
    a, b, _ = fit_rational("gelu")
    x = torch.tensor([1e6, 1e7, 1e10, -1e10, 1e30, -1e30, 1e36])
    out = rational(x, a, b)
    torch.testing.assert_close(out.double(), exact_batch(x, a, b, "B")[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(out[4:].double() / x[4:].double().abs(), (a[6] / b[4].abs()).double().expand(3),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_wide_range(dtype):
    # Half inputs are evaluated in float32 and rounded once; values beyond the dtype clamp to its max.
    a, b, _ = fit_rational("gelu")
    gen = torch.Generator().manual_seed(fresh_seed())
    x = wide_inputs(200, gen, hi=math.log10(torch.finfo(dtype).max)).to(dtype)
    out = rational(x, a, b)
    assert torch.isfinite(out).all()
    fmax = torch.finfo(dtype).max
    expected = exact_batch(x.float(), a, b, "B")[0].clamp(-fmax, fmax)
    ulp = torch.finfo(dtype).eps * expected.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((out.double() - expected).abs() <= ulp + 1e-6).all()

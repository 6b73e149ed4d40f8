"""The rational activation: formula, gradients, fitting, safety."""
import math

import pytest
import torch

from iapt_fast import Rational, fit_rational
from iapt_fast.generator import rational
from iapt_fast.generator.rational import named_activation


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

"""The learned rational activation of IAPT ("safe Padé activation unit").

    version B:  R(x) = (a_0 + a_1 x + … + a_p x^p) / (1 + |b_1 x + … + b_q x^q|)
    version A:  R(x) = (a_0 + a_1 x + … + a_p x^p) / (1 + |b_1 x| + … + |b_q x^q|)

The denominator is >= 1 by construction, so R is finite wherever the numerator is.
Coefficients are initialised by a least-squares fit to a named function, computed here at
construction time (no coefficient tables copied from elsewhere).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor, nn

from iapt_fast.config import RATIONAL_VERSIONS

__all__ = ["rational", "Rational", "fit_rational", "named_activation"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rational(x: Tensor, num: Tensor, den: Tensor, version: str = "B") -> Tensor:
    """Element-wise rational activation, accumulated in float32 (float64 for float64 input).

    Args:
        x: any shape, any float dtype.
        num: [p+1] a_0..a_p, or [..., p+1] broadcastable against ``x[..., None]``.
        den: [q] b_1..b_q, or [..., q] likewise.
        version: "B" (default) or "A".
    Returns:
        R(x), same shape and dtype as ``x``; clamped to the finite range of ``x.dtype``.
    """
    if version not in RATIONAL_VERSIONS:
        raise ValueError(f"version must be one of {RATIONAL_VERSIONS}, got {version!r}")
    if num.shape[-1] < 1 or den.shape[-1] < 1:
        raise ValueError(f"num needs >= 1 and den >= 1 coefficients, got {num.shape[-1]} and {den.shape[-1]}")
    cdt = _compute_dtype(x.dtype)
    xc = x.to(cdt)
    a = num.to(cdt)
    b = den.to(cdt)
    p = a.shape[-1] - 1
    q = b.shape[-1]
    # Horner: a_0 + x (a_1 + x (... + x a_p))
    numer = torch.zeros_like(xc) + a[..., p]
    for i in range(p - 1, -1, -1):
        numer = a[..., i] + xc * numer
    if version == "B":
        poly = torch.zeros_like(xc) + b[..., q - 1]
        for j in range(q - 2, -1, -1):
            poly = b[..., j] + xc * poly
        denom = 1.0 + (xc * poly).abs()
    else:
        denom = torch.ones_like(xc)
        xpow = xc
        for j in range(q):
            denom = denom + (b[..., j] * xpow).abs()
            if j + 1 < q:
                xpow = xpow * xc
    out = numer / denom
    if x.dtype in (torch.float16, torch.bfloat16):
        fmax = torch.finfo(x.dtype).max
        out = out.clamp(-fmax, fmax)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------- fitting
def named_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The float64 reference function a rational is fitted to."""
    table: dict[str, Callable[[Tensor], Tensor]] = {
        "gelu": lambda t: torch.nn.functional.gelu(t),
        "relu": torch.relu,
        "silu": torch.nn.functional.silu,
        "tanh": torch.tanh,
        "identity": lambda t: t.clone(),
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(table)} or a callable")
    return table[name]


def fit_rational(
    fn: str | Callable[[Tensor], Tensor],
    degrees: tuple[int, int] = (6, 5),
    version: str = "B",
    interval: tuple[float, float] = (-3.0, 3.0),
) -> tuple[Tensor, Tensor, float]:
    """Least-squares fit of a rational activation to ``fn`` on ``interval``.

    A linear least-squares solve of ``P(x) - f(x)·(1 + Σ b_j x^j) = 0`` gives a start; a
    float64 L-BFGS refinement of the true (absolute-value) formula, with a loss that weighs
    the worst points more, brings the maximum error down.

    Returns:
        (num [p+1], den [q], max_abs_error on a dense grid of the interval), float32 tensors.
    """
    name = fn if isinstance(fn, str) else None
    if name is not None:
        named_activation(name)  # validates the name
        num, den, err = _fit_cached(name, tuple(int(v) for v in degrees), version, tuple(float(v) for v in interval))
        return num.clone(), den.clone(), err
    if not callable(fn):
        raise ValueError(f"fn must be an activation name or a callable, got {fn!r}")
    num, den, err = _fit(fn, tuple(int(v) for v in degrees), version, tuple(float(v) for v in interval))
    return num, den, err


@functools.lru_cache(maxsize=64)
def _fit_cached(name: str, degrees: tuple[int, int], version: str, interval: tuple[float, float]):
    return _fit(named_activation(name), degrees, version, interval)


def _fit(fn, degrees, version, interval):
    p, q = degrees
    if p < 0 or q < 1:
        raise ValueError(f"degrees must be (p >= 0, q >= 1), got {degrees}")
    if version not in RATIONAL_VERSIONS:
        raise ValueError(f"version must be one of {RATIONAL_VERSIONS}, got {version!r}")
    lo, hi = interval
    x = torch.linspace(lo, hi, 1201, dtype=torch.float64)
    with torch.no_grad():
        y = fn(x).to(torch.float64)
    if y.shape != x.shape or not torch.isfinite(y).all():
        raise ValueError("fn must map a float64 tensor to finite values of the same shape")

    # Linear start: [x^0..x^p, -y x^1..-y x^q] · [a; b] = y
    vander_p = torch.stack([x**i for i in range(p + 1)], dim=1)
    vander_q = torch.stack([x ** (j + 1) for j in range(q)], dim=1)
    design = torch.cat([vander_p, -y[:, None] * vander_q], dim=1)
    scale = design.abs().amax(dim=0).clamp_min(1e-12)
    sol = torch.linalg.lstsq(design / scale, y[:, None], driver="gelsd").solution[:, 0] / scale
    a0, b0 = sol[: p + 1].clone(), sol[p + 1 :].clone()

    best = _refine(x, y, a0, b0, version)
    # A denominator that is identically 1 (b = 0) is a polynomial fit: always a valid start.
    poly = torch.linalg.lstsq(vander_p, y[:, None], driver="gelsd").solution[:, 0]
    alt = _refine(x, y, poly, torch.zeros(q, dtype=torch.float64) + 1e-3, version)
    if _max_err(x, y, *alt, version) < _max_err(x, y, *best, version):
        best = alt
    a, b = best
    grid = torch.linspace(lo, hi, 20001, dtype=torch.float64)
    with torch.no_grad():
        err = (rational(grid, a, b, version) - fn(grid).to(torch.float64)).abs().max().item()
    return a.to(torch.float32), b.to(torch.float32), float(err)


def _max_err(x, y, a, b, version):
    with torch.no_grad():
        return (rational(x, a, b, version) - y).abs().max().item()


def _refine(x, y, a0, b0, version):
    a = a0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    best = (a0.clone(), b0.clone(), _max_err(x, y, a0, b0, version))
    if not math.isfinite(best[2]):
        best = (a0.clone(), b0.clone(), math.inf)
    # Increasing exponent: least squares first, then an L^k norm that approaches minimax.
    for power in (2, 4, 8):
        opt = torch.optim.LBFGS([a, b], lr=1.0, max_iter=150, tolerance_grad=1e-14,
                                tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            r = (rational(x, a, b, version) - y) / max(best[2], 1e-9) if best[2] < math.inf else rational(x, a, b, version) - y
            loss = (r.abs() ** power).mean()
            loss.backward()
            return loss

        try:
            opt.step(closure)
        except RuntimeError:
            break
        err = _max_err(x, y, a, b, version)
        if math.isfinite(err) and err < best[2]:
            best = (a.detach().clone(), b.detach().clone(), err)
        else:
            with torch.no_grad():
                a.copy_(best[0])
                b.copy_(best[1])
    return best[0], best[1]


# ---------------------------------------------------------------------------- module
class Rational(nn.Module):
    """A learnable rational activation with coefficients fitted to ``init`` at construction.

    Args:
        degrees: (p, q).
        version: "B" or "A".
        init: activation name or callable the coefficients are fitted to.
        interval: interval of the fit.
    Attributes:
        numerator: Parameter [p+1]; denominator: Parameter [q]; fit_error: float.
    """

    def __init__(
        self,
        degrees: tuple[int, int] = (6, 5),
        version: str = "B",
        init: str | Callable[[Tensor], Tensor] = "gelu",
        interval: tuple[float, float] = (-3.0, 3.0),
    ) -> None:
        super().__init__()
        num, den, err = fit_rational(init, degrees, version, interval)
        self.version = version
        self.fit_error = err
        self.numerator = nn.Parameter(num)
        self.denominator = nn.Parameter(den)

    def forward(self, x: Tensor) -> Tensor:
        return rational(x, self.numerator, self.denominator, self.version)

    def extra_repr(self) -> str:
        p, q = self.numerator.numel() - 1, self.denominator.numel()
        return f"degrees=({p}, {q}), version={self.version!r}, fit_error={self.fit_error:.2e}"

"""The learned rational activation of IAPT ("safe Padé activation unit").

    version B:  R(x) = (a_0 + a_1 x + … + a_p x^p) / (1 + |b_1 x + … + b_q x^q|)
    version A:  R(x) = (a_0 + a_1 x + … + a_p x^p) / (1 + |b_1 x| + … + |b_q x^q|)

The denominator is >= 1 by construction. R is evaluated without forming large powers of x
(design.md §1: for |x| > 1, Horner in 1/x on numerator and denominator divided by |x|^q), so R
and its gradients stay finite wherever their values are, e.g. R(x) ~ (a_6/|b_5|)·|x| for the
default (6, 5) up to |x| ~ 1e36 in float32.
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
        R(x), same shape and dtype as ``x``; half-precision results are clamped to the finite
        range of ``x.dtype``, float32/float64 ones are ±inf only where the true value is beyond it.
        Differentiable w.r.t. ``x``, ``num`` and ``den`` (gradients written out, design.md §1).
    """
    if version not in RATIONAL_VERSIONS:
        raise ValueError(f"version must be one of {RATIONAL_VERSIONS}, got {version!r}")
    if num.shape[-1] < 1 or den.shape[-1] < 1:
        raise ValueError(f"num needs >= 1 and den >= 1 coefficients, got {num.shape[-1]} and {den.shape[-1]}")
    cdt = _compute_dtype(x.dtype)
    out = _RationalFunction.apply(x.to(cdt), num.to(cdt), den.to(cdt), version == "B")
    if x.dtype in (torch.float16, torch.bfloat16):
        fmax = torch.finfo(x.dtype).max
        out = out.clamp(-fmax, fmax)
    return out.to(x.dtype)


class _Scaled:
    """R(x) in the overflow-free form of design.md §1, element-wise, with what its gradients reuse.

    For |x| > 1 numerator and denominator are divided by |x|^q and run by Horner in t = 1/x;
    the ratio f is then multiplied by k(p), where k(i) = x^i/|x|^q. Both forms are computed
    branch-free (each Horner step selects its coefficient), and lanes of the other form see
    x = 1, so no inf or NaN arises on finite input. kernels/rational_tl.py evaluates the same
    expressions in the same order.
    """

    def __init__(self, x: Tensor, a: Tensor, b: Tensor, version_b: bool) -> None:
        self.x, self.a, self.b, self.version_b = x, a, b, version_b
        self.p, self.q = a.shape[-1] - 1, b.shape[-1]
        self.big = x.abs() > 1
        self.xb = torch.where(self.big, x, 1.0)
        self.ub = 1.0 / self.xb  # t = 1/x where |x| > 1, else 1
        self.u = torch.where(self.big, self.ub, x)  # the Horner variable, |u| <= 1
        self.sq = torch.sign(self.xb) if self.q % 2 else torch.ones_like(self.xb)  # sign(x)^q
        p, q = self.p, self.q
        # P(x), or P(x)·x^-p = a_p + a_{p-1} t + … + a_0 t^p
        numer = self._pick(a, 0, p)
        for k in range(1, p + 1):
            numer = self._pick(a, k, p - k) + self.u * numer
        # S(x)/x = b_1 + … + b_q x^(q-1), or S(x)·x^-q = b_q + … + b_1 t^(q-1); |b_j|, |u| for A
        bb, uu = (b, self.u) if version_b else (b.abs(), self.u.abs())
        poly = self._pick(bb, 0, q - 1)
        for k in range(1, q):
            poly = self._pick(bb, k, q - 1 - k) + uu * poly
        lead = torch.where(self.big, self.sq, x) if version_b else torch.where(self.big, 1.0, x.abs())
        self.sh = lead * poly  # S(x), or S(x)/|x|^q: same sign as S(x)
        # D(x), or D(x)/|x|^q = |t|^q + |S(x)|/|x|^q. Only a vanishing b_q lets the scaled form
        # underflow; the floor keeps 0/0 out of that degenerate case.
        tq = torch.ones_like(x)
        for _ in range(q):
            tq = tq * self.ub.abs()
        self.dh = (tq + self.sh.abs()).clamp_min(torch.finfo(x.dtype).tiny)
        self.f = numer / self.dh  # R(x), or R(x)/k(p)
        self.r = self.times_k(self.f, p)

    def _pick(self, c: Tensor, k_big: int, k_small: int) -> Tensor:
        return torch.where(self.big, c[..., k_big], c[..., k_small])

    def times_pow(self, c: Tensor, n: int, absolute: bool = False) -> Tensor:
        """c·x^(n-q) where |x| > 1 (|x| with ``absolute``), c elsewhere, for any integer n. One factor
        at a time from c, so an intermediate leaves the float range only when the result does."""
        xb, ub = (self.xb.abs(), self.ub.abs()) if absolute else (self.xb, self.ub)
        step, count = (xb, n - self.q) if n >= self.q else (ub, self.q - n)
        for _ in range(count):
            c = c * step
        return c

    def times_k(self, c: Tensor, i: int) -> Tensor:
        """c·k(i), k(i) = x^i/|x|^q = sign(x)^q·x^(i-q) where |x| > 1, 1 elsewhere."""
        return self.times_pow(c * self.sq, i)

    def dx(self) -> Tensor:
        """dR/dx = (P' − R·D')/D with P', D' scaled like P, D (by |x|^q where |x| > 1):
        P'/|x|^q = k(p-1)·(p a_p + … + a_1 t^(p-1)), D'/|x|^q = sign(S)·k(q-1)·(q b_q + … + b_1 t^(q-1)),
        and k(p)·k(q-1) = sign(x)^q·k(p-1), so k(p-1) is factored out of both terms and dR/dx
        stays finite where R itself overflows."""
        a, b, p, q, big = self.a, self.b, self.p, self.q, self.big
        dnum = torch.zeros_like(self.x)
        if p > 0:  # p a_p + (p-1) a_{p-1} t + … + a_1 t^(p-1), or P'(x) by Horner in x
            dnum = torch.where(big, a[..., 1], p * a[..., p])
            for k in range(1, p):
                dnum = torch.where(big, (k + 1) * a[..., k + 1], (p - k) * a[..., p - k]) + self.u * dnum
        bb, uu = (b, self.u) if self.version_b else (b.abs(), self.u.abs())
        dpoly = torch.where(big, bb[..., 0], q * bb[..., q - 1])
        for k in range(1, q):
            dpoly = torch.where(big, (k + 1) * bb[..., k], (q - k) * bb[..., q - 1 - k]) + uu * dpoly
        if self.version_b:
            dden = torch.sign(self.sh) * self.sq * dpoly
        else:  # D' = sign(x)·Σ j|b_j||x|^(j-1), and k(q-1) = sign(x)^(q-1)·|t|
            dden = torch.sign(self.x) * torch.sign(self.xb) * dpoly
        return self.times_k((dnum - self.f * dden) / self.dh, p - 1)

    def coefficient_terms(self, grad: Tensor):
        """Yield (i, g·dR/da_i or None, g·dR/db_i or None) element-wise for i = 0 … max(p, q).

        dR/da_i = x^i/D = k(i)/Dh where |x| > 1; dR/db_j = −R·sign(S)·x^j/D, whose R·x^j/D =
        f·k(p)·k(j)/Dh = f·x^(p+j-2q)/Dh there (version A: −R·sign(b_j)·|x|^j/D, with
        sign(x)^p·|x|^(p+j-2q)). The powers multiply the per-element factor one at a time."""
        g_over_d = grad / self.dh
        common = -g_over_d * self.f
        if self.version_b:
            common = common * torch.sign(self.sh)
        sp = torch.sign(self.xb) if self.p % 2 else torch.ones_like(self.xb)
        upow = torch.ones_like(self.x)  # x^i where |x| <= 1
        for i in range(max(self.p, self.q) + 1):
            da = torch.where(self.big, self.times_k(g_over_d, i), g_over_d * upow) if i <= self.p else None
            db = None
            if 1 <= i <= self.q:
                n = self.p + i - self.q
                if self.version_b:
                    db = torch.where(self.big, self.times_pow(common, n), common * upow)
                else:
                    c = common * torch.sign(self.b[..., i - 1])
                    db = torch.where(self.big, self.times_pow(c * sp, n, absolute=True), c * upow.abs())
            yield i, da, db
            upow = upow * self.u


class _RationalFunction(torch.autograd.Function):
    """R with the gradients of design.md §1 written out: autograd through the scaled form
    would form dR/dt = −x²·dR/dx and products of tiny powers of t, which overflow or
    underflow where the gradients themselves do not."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, b: Tensor, version_b: bool) -> Tensor:
        ctx.save_for_backward(x, a, b)
        ctx.version_b = version_b
        return _Scaled(x, a, b, version_b).r

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, a, b = ctx.saved_tensors
        s = _Scaled(x, a, b, ctx.version_b)
        gx = grad * s.dx() if ctx.needs_input_grad[0] else None
        ga = gb = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            da, db = [], []
            for i, term_a, term_b in s.coefficient_terms(grad):
                if term_a is not None:
                    da.append(term_a.sum_to_size(a[..., i].shape))
                if term_b is not None:
                    db.append(term_b.sum_to_size(b[..., i - 1].shape))
            ga = torch.stack(da, dim=-1) if ctx.needs_input_grad[1] else None
            gb = torch.stack(db, dim=-1) if ctx.needs_input_grad[2] else None
        return gx, ga, gb, None


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

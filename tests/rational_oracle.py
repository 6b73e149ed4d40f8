"""Exact value and gradients of the rational activation, for tests on inputs up to 1e30.

Every float is a binary fraction, so ``fractions.Fraction`` evaluates design.md §1's formula
and its derivatives term by term without rounding or overflow, independently of the code
under test; the results are then rounded once to float64.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction

import torch


def _sgn(v: Fraction) -> int:
    return (v > 0) - (v < 0)


def exact(x: float, a: list[float], b: list[float], version: str) -> tuple[float, float, list[float], list[float]]:
    """(R, dR/dx, [dR/da_i], [dR/db_j]) at one point; d|s|/ds = sign(s), sign(0) = 0."""
    xf = Fraction(x)
    af = [Fraction(v) for v in a]
    bf = [Fraction(v) for v in b]
    pw = [Fraction(1)]
    for _ in range(max(len(af), len(bf) + 1)):
        pw.append(pw[-1] * xf)
    numer = sum(c * pw[i] for i, c in enumerate(af))
    dnumer = sum(i * c * pw[i - 1] for i, c in enumerate(af) if i)
    if version == "B":
        s = sum(c * pw[j + 1] for j, c in enumerate(bf))
        denom = 1 + abs(s)
        ddenom = _sgn(s) * sum((j + 1) * c * pw[j] for j, c in enumerate(bf))
        dd_db = [_sgn(s) * pw[j + 1] for j in range(len(bf))]
    else:
        terms = [c * pw[j + 1] for j, c in enumerate(bf)]
        denom = 1 + sum(abs(t) for t in terms)
        ddenom = sum(_sgn(t) * (j + 1) * c * pw[j] for j, (t, c) in enumerate(zip(terms, bf)))
        dd_db = [_sgn(t) * pw[j + 1] for j, t in enumerate(terms)]
    r = numer / denom
    dx = (dnumer - r * ddenom) / denom
    return (float(r), float(dx), [float(pw[i] / denom) for i in range(len(af))],
            [float(-r * d / denom) for d in dd_db])


def exact_batch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, version: str):
    """exact() over a 1-D x with shared coefficients: float64 tensors R [n], dx [n], da [n, p+1], db [n, q]."""
    al, bl = a.double().tolist(), b.double().tolist()
    rows = [exact(v, al, bl, version) for v in x.double().tolist()]
    r = torch.tensor([row[0] for row in rows], dtype=torch.float64)
    dx = torch.tensor([row[1] for row in rows], dtype=torch.float64)
    da = torch.tensor([row[2] for row in rows], dtype=torch.float64)
    db = torch.tensor([row[3] for row in rows], dtype=torch.float64)
    return r, dx, da, db


def wide_inputs(n: int, gen: torch.Generator, lo: float = -3.0, hi: float = 30.0) -> torch.Tensor:
    """n float32 inputs of both signs with log10|x| uniform in [lo, hi], plus 0 and ±1 (the seam)."""
    mag = 10.0 ** (lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64))
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    seam = torch.tensor([0.0, 1.0, -1.0, 1.0000001, -1.0000001, 0.9999999], dtype=torch.float64)
    return torch.cat([mag * sign, seam]).float()


def random_coefficients(p: int, q: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficient k ~ N(0, (0.5/k!)²), as tests/kernels_cases.py draws them; float32."""
    fact = torch.tensor([float(math.factorial(k)) for k in range(max(p, q) + 1)], dtype=torch.float64)
    a = torch.randn(p + 1, generator=gen, dtype=torch.float64) * 0.5 / fact[: p + 1]
    b = torch.randn(q, generator=gen, dtype=torch.float64) * 0.5 / fact[1: q + 1]
    return a.float(), b.float()


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def decades(x: torch.Tensor) -> list[torch.Tensor]:
    """Boolean masks splitting x by decade of |x| (|x| < 1 is one band): the design.md §4 rule
    takes a max over a tensor, so values of one size are compared together."""
    e = torch.floor(torch.log10(x.double().abs().clamp_min(1.0))).long()
    return [e == k for k in torch.unique(e).tolist()]


def autograd_per_point(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, version: str) -> tuple[torch.Tensor, ...]:
    """R(x) [n] and its per-point gradients dR/dx [n], dR/da [n, p+1], dR/db [n, q] by autograd of
    ``iapt_fast.generator.rational.rational`` (coefficients a [p+1], b [q] repeated per point)."""
    from iapt_fast.generator.rational import rational

    n = x.numel()
    xl = x.clone().requires_grad_(True)
    al = a.expand(n, -1).clone().requires_grad_(True)
    bl = b.expand(n, -1).clone().requires_grad_(True)
    out = rational(xl, al, bl, version)
    return (out.detach(), *torch.autograd.grad(out.sum(), (xl, al, bl)))

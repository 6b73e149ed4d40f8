"""The rational activation inside Triton kernels: value, derivative in x, coefficient terms.

    version B:  R(x) = P(x) / (1 + |S(x)|),        S(x) = b_1 x + … + b_q x^q
    version A:  R(x) = P(x) / (1 + Σ_j |b_j x^j|)
    P(x) = a_0 + a_1 x + … + a_p x^p

Degrees are constexpr (P1 = p + 1 numerator and Q denominator coefficients), so every loop is
unrolled; coefficients are scalars loaded once per adapter. d|s|/ds is taken as sign(s) with
sign(0) = 0, which is what torch autograd does for abs.
"""
import triton
import triton.language as tl


@triton.jit
def _sign(v):
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))


@triton.jit
def rat_numerator(x, num_ptr, P1: tl.constexpr):
    """P(x) by Horner, float32."""
    numer = tl.zeros_like(x) + tl.load(num_ptr + (P1 - 1)).to(tl.float32)
    for i in tl.static_range(P1 - 1):
        numer = tl.load(num_ptr + (P1 - 2 - i)).to(tl.float32) + x * numer
    return numer


@triton.jit
def rat_denominator(x, den_ptr, Q: tl.constexpr, VERSION_B: tl.constexpr):
    """1 + |S(x)| (version B) or 1 + Σ|b_j x^j| (version A), float32."""
    if VERSION_B:
        poly = tl.zeros_like(x) + tl.load(den_ptr + (Q - 1)).to(tl.float32)
        for j in tl.static_range(Q - 1):
            poly = tl.load(den_ptr + (Q - 2 - j)).to(tl.float32) + x * poly
        denom = 1.0 + tl.abs(x * poly)
    else:
        denom = tl.zeros_like(x) + 1.0
        xpow = x
        for j in tl.static_range(Q):
            denom = denom + tl.abs(tl.load(den_ptr + j).to(tl.float32) * xpow)
            xpow = xpow * x
    return denom


@triton.jit
def rat_forward(x, num_ptr, den_ptr, P1: tl.constexpr, Q: tl.constexpr, VERSION_B: tl.constexpr):
    """R(x), float32, element-wise."""
    return rat_numerator(x, num_ptr, P1) / rat_denominator(x, den_ptr, Q, VERSION_B)


@triton.jit
def rat_dx(x, num_ptr, den_ptr, P1: tl.constexpr, Q: tl.constexpr, VERSION_B: tl.constexpr):
    """(dR/dx, P(x), D(x)) element-wise, float32; P and D feed the coefficient gradients."""
    numer = tl.zeros_like(x) + tl.load(num_ptr + (P1 - 1)).to(tl.float32)
    dnumer = tl.zeros_like(x)
    for i in tl.static_range(P1 - 1):
        dnumer = numer + x * dnumer
        numer = tl.load(num_ptr + (P1 - 2 - i)).to(tl.float32) + x * numer
    if VERSION_B:
        # S(x) = x·poly(x); S'(x) = poly + x·poly'
        poly = tl.zeros_like(x) + tl.load(den_ptr + (Q - 1)).to(tl.float32)
        dpoly = tl.zeros_like(x)
        for j in tl.static_range(Q - 1):
            dpoly = poly + x * dpoly
            poly = tl.load(den_ptr + (Q - 2 - j)).to(tl.float32) + x * poly
        s = x * poly
        denom = 1.0 + tl.abs(s)
        ddenom = _sign(s) * (poly + x * dpoly)
    else:
        denom = tl.zeros_like(x) + 1.0
        ddenom = tl.zeros_like(x)
        xpow_prev = tl.zeros_like(x) + 1.0  # x^(j-1)
        for j in tl.static_range(Q):
            b = tl.load(den_ptr + j).to(tl.float32)
            term = b * xpow_prev * x
            denom = denom + tl.abs(term)
            ddenom = ddenom + _sign(term) * b * (j + 1) * xpow_prev
            xpow_prev = xpow_prev * x
    dx = dnumer / denom - numer * ddenom / (denom * denom)
    return dx, numer, denom


@triton.jit
def rat_coef_grads_atomic(x, g, numer, denom, den_ptr, dnum_ptr, dden_ptr,
                          P1: tl.constexpr, Q: tl.constexpr, VERSION_B: tl.constexpr):
    """Add Σ g·dR/da_i and Σ g·dR/db_j over the whole tile: one atomic per coefficient.

    x, g, numer, denom: float32 tiles of one adapter (g = 0 where the tile is invalid).
    """
    g_over_d = g / denom
    xpow = tl.zeros_like(x) + 1.0
    for i in tl.static_range(P1):
        tl.atomic_add(dnum_ptr + i, tl.sum(tl.sum(g_over_d * xpow, axis=1), axis=0))
        xpow = xpow * x
    common = -g_over_d * numer / denom
    if VERSION_B:
        poly = tl.zeros_like(x) + tl.load(den_ptr + (Q - 1)).to(tl.float32)
        for j in tl.static_range(Q - 1):
            poly = tl.load(den_ptr + (Q - 2 - j)).to(tl.float32) + x * poly
        common = common * _sign(x * poly)
        xpow = x
        for j in tl.static_range(Q):
            tl.atomic_add(dden_ptr + j, tl.sum(tl.sum(common * xpow, axis=1), axis=0))
            xpow = xpow * x
    else:
        xpow = x
        for j in tl.static_range(Q):
            b = tl.load(den_ptr + j).to(tl.float32)
            tl.atomic_add(dden_ptr + j, tl.sum(tl.sum(common * _sign(b * xpow) * xpow, axis=1), axis=0))
            xpow = xpow * x

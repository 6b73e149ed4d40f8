"""The rational activation inside Triton kernels: value, derivative in x, coefficient terms.

    version B:  R(x) = P(x) / (1 + |S(x)|),        S(x) = b_1 x + … + b_q x^q
    version A:  R(x) = P(x) / (1 + Σ_j |b_j x^j|)
    P(x) = a_0 + a_1 x + … + a_p x^p

Evaluated as iapt_fast/generator/rational.py does it (design.md §1): for |x| > 1 numerator
and denominator are divided by |x|^q and run by Horner in t = 1/x, then the ratio is
multiplied by x^p/|x|^q, so no power of a large x is formed and R stays finite wherever its
value is. Branch-free: every Horner step selects its coefficient per element.

Degrees are constexpr (P1 = p + 1 numerator and Q denominator coefficients), so every loop is
unrolled; coefficients are scalars loaded once per adapter. d|s|/ds is taken as sign(s) with
sign(0) = 0, which is what torch autograd does for abs.

Notation of the scaled form, per element: big = |x| > 1; xb = x where big, else 1; ub = 1/xb;
u = ub where big, else x (|u| <= 1); sq = sign(xb)^q; k(i) = x^i/|x|^q where big, else 1
(sq·xb^(i-q) for i >= q, sq·ub^(q-i) below); Dh = D(x)/|x|^q where big, else D(x); R = f·k(p).
"""
import triton
import triton.language as tl

# Floor of the scaled denominator: only a vanishing b_q lets it underflow (no 0/0 then).
_FLT_MIN = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _sign(v):
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))


@triton.jit
def _frame(x, Q: tl.constexpr):
    """(big, xb, ub, u, sq) of the module docstring; every lane finite for finite x."""
    big = tl.abs(x) > 1.0
    xb = tl.where(big, x, 1.0)
    ub = 1.0 / xb
    u = tl.where(big, ub, x)
    if Q % 2 == 1:
        sq = _sign(xb)
    else:
        sq = tl.zeros_like(x) + 1.0
    return big, xb, ub, u, sq


@triton.jit
def _times_pow(c, xb, ub, N: tl.constexpr, Q: tl.constexpr):
    """c·xb^(N-Q) (N >= Q) or c·ub^(Q-N), one factor at a time from c, so an intermediate
    leaves the float range only when the result does; c where |x| <= 1 (xb = ub = 1)."""
    if N >= Q:
        for _ in tl.static_range(N - Q):
            c = c * xb
    else:
        for _ in tl.static_range(Q - N):
            c = c * ub
    return c


@triton.jit
def _scaled(x, num_ptr, den_ptr, P1: tl.constexpr, Q: tl.constexpr, VERSION_B: tl.constexpr):
    """(f, Dh, Sh): R = f·k(p), the scaled denominator, and the scaled S (sign(Sh) = sign(S))."""
    big, xb, ub, u, sq = _frame(x, Q)
    # P(x), or P(x)·x^-p = a_p + a_{p-1} t + … + a_0 t^p
    numer = tl.where(big, tl.load(num_ptr).to(tl.float32), tl.load(num_ptr + (P1 - 1)).to(tl.float32))
    for k in tl.static_range(1, P1):
        c = tl.where(big, tl.load(num_ptr + k).to(tl.float32), tl.load(num_ptr + (P1 - 1 - k)).to(tl.float32))
        numer = c + u * numer
    # S(x)/x = b_1 + … + b_q x^(q-1), or S(x)·x^-q = b_q + … + b_1 t^(q-1); |b_j| and |u| for A
    if VERSION_B:
        uu = u
        lead = tl.where(big, sq, x)
        poly = tl.where(big, tl.load(den_ptr).to(tl.float32), tl.load(den_ptr + (Q - 1)).to(tl.float32))
    else:
        uu = tl.abs(u)
        lead = tl.where(big, 1.0, tl.abs(x))
        poly = tl.where(big, tl.abs(tl.load(den_ptr).to(tl.float32)), tl.abs(tl.load(den_ptr + (Q - 1)).to(tl.float32)))
    for k in tl.static_range(1, Q):
        c = tl.where(big, tl.load(den_ptr + k).to(tl.float32), tl.load(den_ptr + (Q - 1 - k)).to(tl.float32))
        if not VERSION_B:
            c = tl.abs(c)
        poly = c + uu * poly
    sh = lead * poly
    tq = tl.zeros_like(x) + 1.0
    for _ in tl.static_range(Q):
        tq = tq * tl.abs(ub)
    dh = tl.maximum(tq + tl.abs(sh), _FLT_MIN)
    return numer / dh, dh, sh


@triton.jit
def rat_forward(x, num_ptr, den_ptr, P1: tl.constexpr, Q: tl.constexpr, VERSION_B: tl.constexpr):
    """R(x), float32, element-wise."""
    big, xb, ub, u, sq = _frame(x, Q)
    f, dh, sh = _scaled(x, num_ptr, den_ptr, P1, Q, VERSION_B)
    return _times_pow(f * sq, xb, ub, P1 - 1, Q)


@triton.jit
def rat_dx(x, num_ptr, den_ptr, P1: tl.constexpr, Q: tl.constexpr, VERSION_B: tl.constexpr):
    """(dR/dx, f, Dh, Sh) element-wise, float32; f, Dh, Sh feed rat_coef_grads_atomic.

    dR/dx = (P' − R·D')/D with P', D' scaled like P, D (by |x|^q where |x| > 1):
    P'/|x|^q = k(p-1)·(p a_p + … + a_1 t^(p-1)), D'/|x|^q = sign(S)·k(q-1)·(q b_q + … + b_1 t^(q-1)),
    and k(p)·k(q-1) = sign(x)^q·k(p-1): k(p-1) is factored out of both terms, so dR/dx stays
    finite where R itself overflows.
    """
    big, xb, ub, u, sq = _frame(x, Q)
    f, dh, sh = _scaled(x, num_ptr, den_ptr, P1, Q, VERSION_B)
    dnum = tl.zeros_like(x)
    if P1 > 1:
        dnum = tl.where(big, tl.load(num_ptr + 1).to(tl.float32), (P1 - 1) * tl.load(num_ptr + (P1 - 1)).to(tl.float32))
        for k in tl.static_range(1, P1 - 1):
            c = tl.where(big, (k + 1) * tl.load(num_ptr + (k + 1)).to(tl.float32),
                         (P1 - 1 - k) * tl.load(num_ptr + (P1 - 1 - k)).to(tl.float32))
            dnum = c + u * dnum
    if VERSION_B:
        uu = u
        dpoly = tl.where(big, tl.load(den_ptr).to(tl.float32), Q * tl.load(den_ptr + (Q - 1)).to(tl.float32))
    else:
        uu = tl.abs(u)
        dpoly = tl.where(big, tl.abs(tl.load(den_ptr).to(tl.float32)), Q * tl.abs(tl.load(den_ptr + (Q - 1)).to(tl.float32)))
    for k in tl.static_range(1, Q):
        c = tl.where(big, (k + 1) * tl.load(den_ptr + k).to(tl.float32),
                     (Q - k) * tl.load(den_ptr + (Q - 1 - k)).to(tl.float32))
        if not VERSION_B:
            c = tl.abs(c)
        dpoly = c + uu * dpoly
    if VERSION_B:
        dden = _sign(sh) * sq * dpoly
    else:  # D' = sign(x)·Σ j|b_j||x|^(j-1), and k(q-1) = sign(x)^(q-1)·|t|
        dden = _sign(x) * _sign(xb) * dpoly
    dx = _times_pow((dnum - f * dden) / dh * sq, xb, ub, P1 - 2, Q)
    return dx, f, dh, sh


@triton.jit
def rat_coef_grads_atomic(x, g, f, dh, sh, den_ptr, dnum_ptr, dden_ptr,
                          P1: tl.constexpr, Q: tl.constexpr, VERSION_B: tl.constexpr):
    """Add Σ g·dR/da_i and Σ g·dR/db_j over the whole tile: one atomic per coefficient.

    x, g, f, dh, sh: float32 tiles of one adapter (g = 0 where the tile is invalid; f, dh, sh
    from rat_dx). dR/da_i = x^i/D = k(i)/Dh where |x| > 1; dR/db_j = −R·sign(S)·x^j/D, whose
    R·x^j/D = f·x^(p+j-2q)/Dh there (version A: −R·sign(b_j)·|x|^j/D, with
    sign(x)^p·|x|^(p+j-2q)). The powers multiply the per-element factor one at a time.
    """
    big, xb, ub, u, sq = _frame(x, Q)
    g_over_d = g / dh
    common = -g_over_d * f
    if VERSION_B:
        common = common * _sign(sh)
    if (P1 - 1) % 2 == 1:
        sp = _sign(xb)
    else:
        sp = tl.zeros_like(x) + 1.0
    upow = tl.zeros_like(x) + 1.0  # x^i where |x| <= 1
    for i in tl.static_range(P1 + Q):
        if i < P1:
            da = tl.where(big, _times_pow(g_over_d * sq, xb, ub, i, Q), g_over_d * upow)
            tl.atomic_add(dnum_ptr + i, tl.sum(tl.sum(da, axis=1), axis=0))
        if (i >= 1) & (i <= Q):
            if VERSION_B:
                db = tl.where(big, _times_pow(common, xb, ub, P1 - 1 + i - Q, Q), common * upow)
            else:
                c = common * _sign(tl.load(den_ptr + (i - 1)).to(tl.float32))
                db = tl.where(big, _times_pow(c * sp, tl.abs(xb), tl.abs(ub), P1 - 1 + i - Q, Q), c * tl.abs(upow))
            tl.atomic_add(dden_ptr + (i - 1), tl.sum(tl.sum(db, axis=1), axis=0))
        upow = upow * u

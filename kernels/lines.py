"""Small adapter-gathered GEMMs of the generator: the per-row head and the weight gradients.

A "line" is one (row, soft token) pair; the head maps pooled lines through the row's adapter:

    p = Ph · W_down[a],  P = R(p) · W_up[a]          (forward)
    dr = dP · W_up[a]ᵀ,  dp = dr·R'(p),  dPh = dp · W_down[a]ᵀ   (backward)

Rows are visited in adapter-sorted order (``order``, ``sids`` = sorted ids), so one program's
block of BLOCK_L lines touches few adapters and reads each adapter's weights once per block
(the BGMV/Punica idea: one launch for a mixed batch, weights shared by rows of a tenant).
Inside a block, lines_mm_kernel loops over the distinct adapters it holds.

Weight gradients (seg_outer_kernel) are per-adapter sums over that adapter's contiguous
segment of sorted rows: one program per output tile reduces its whole segment in registers
and stores once. No atomics, deterministic, and unused adapters get exact zeros.
adapter_mm_kernel does the per-adapter products W_down·W_pool (forward) and W_down^T·dW_dp.
"""
import triton
import triton.language as tl

from .common import cast_for, dot_ff
from .rational_tl import rat_coef_grads_atomic, rat_dx, rat_forward

# lines_mm_kernel modes
MODE_GEMM = 0   # out = x · W[a]            (p = Ph·W_down, dr = dP·W_upᵀ, dPh = dp·W_downᵀ)
MODE_OUT = 1    # out = R(x) · W[a]         (P = R(p)·W_up)


@triton.jit
def lines_mm_kernel(
    x_ptr, w_ptr, out_ptr, order_ptr, sorted_ids_ptr, num_ptr, den_ptr, anchor_ptr, scale_ptr,
    B, T, K, NOUT, K_PER_SPLIT,
    s_xb, s_xt, s_xk, s_wa, s_wk, s_wn, s_ob, s_ot, s_on, s_na, s_da, s_aa, s_at, s_an, s_sa,
    MODE: tl.constexpr, ATOMIC: tl.constexpr, LINES_PER_ROW: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_NO: tl.constexpr, P1: tl.constexpr, Q: tl.constexpr,
    VERSION_B: tl.constexpr, PREC: tl.constexpr, ANCHOR: tl.constexpr, SCALE: tl.constexpr,
):
    """out[row, t, :] = f(x[row, t, :]) · W[a(row)] for the BLOCK_L lines of this program,
    over the slice [pid_k·K_PER_SPLIT, +K_PER_SPLIT) of K. With ATOMIC (split K; out float32
    and zeroed) the slice's product is added with one atomic per element per program.

    Epilogue of the anchored form (never with ATOMIC): out = anchor[a, t, :] + scale[a] · out
    (ANCHOR adds the anchor, SCALE multiplies by the scale), fused into the single store."""
    BLOCK_R: tl.constexpr = BLOCK_L // LINES_PER_ROW
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    k_lo = tl.program_id(2) * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    offs_l = tl.arange(0, BLOCK_L)
    slot = offs_l // LINES_PER_ROW
    t = offs_l % LINES_PER_ROW
    pos = pid_r * BLOCK_R + slot
    pos_ok = pos < B
    line_ok = pos_ok & (t < T)
    row = tl.load(order_ptr + pos, mask=pos_ok, other=0).to(tl.int64)
    line_adapter = tl.load(sorted_ids_ptr + pos, mask=pos_ok, other=-1)
    offs_o = pid_n * BLOCK_NO + tl.arange(0, BLOCK_NO)
    o_ok = offs_o < NOUT
    offs_bk = tl.arange(0, BLOCK_K)
    out = tl.zeros([BLOCK_L, BLOCK_NO], tl.float32)
    # Rows are adapter-sorted: visit each distinct adapter of this block once.
    for j in range(0, BLOCK_R):
        pj = pid_r * BLOCK_R + j
        if pj < B:
            a = tl.load(sorted_ids_ptr + pj)
            a_prev = tl.load(sorted_ids_ptr + tl.maximum(pj - 1, 0))
            if (j == 0) | (a != a_prev):
                a64 = a.to(tl.int64)
                sel = line_ok & (line_adapter == a)
                for k0 in range(k_lo, k_hi, BLOCK_K):
                    offs_k = k0 + offs_bk
                    k_ok = offs_k < k_hi
                    xm = sel[:, None] & k_ok[None, :]
                    x = tl.load(x_ptr + row[:, None] * s_xb + t[:, None] * s_xt + offs_k[None, :] * s_xk,
                                mask=xm, other=0.0).to(tl.float32)
                    if MODE == 1:
                        x = tl.where(xm, rat_forward(x, num_ptr + a64 * s_na, den_ptr + a64 * s_da,
                                                     P1, Q, VERSION_B), 0.0)
                    w = tl.load(w_ptr + a64 * s_wa + offs_k[:, None] * s_wk + offs_o[None, :] * s_wn,
                                mask=k_ok[:, None] & o_ok[None, :], other=0.0)
                    # x is zero outside this adapter's lines, so the sum over adapters is exact.
                    out += dot_ff(x, w, PREC)
    o_ptrs = out_ptr + row[:, None] * s_ob + t[:, None] * s_ot + offs_o[None, :] * s_on
    o_mask = line_ok[:, None] & o_ok[None, :]
    adapter_of_line = tl.maximum(line_adapter, 0).to(tl.int64)
    if SCALE:
        sc = tl.load(scale_ptr + adapter_of_line * s_sa, mask=line_ok, other=0.0).to(tl.float32)
        out = out * sc[:, None]
    if ANCHOR:
        out += tl.load(anchor_ptr + adapter_of_line[:, None] * s_aa + t[:, None] * s_at + offs_o[None, :] * s_an,
                       mask=o_mask, other=0.0).to(tl.float32)
    if ATOMIC:
        tl.atomic_add(o_ptrs, out, mask=o_mask)
    else:
        tl.store(o_ptrs, cast_for(out, out_ptr), mask=o_mask)


@triton.jit
def rat_bwd_kernel(
    dr_ptr, p_ptr, dp_ptr, order_ptr, sorted_ids_ptr, num_ptr, den_ptr, dnum_ptr, dden_ptr,
    B, T, M,
    s_na, s_da,
    LINES_PER_ROW: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, P1: tl.constexpr,
    Q: tl.constexpr, VERSION_B: tl.constexpr,
):
    """dp = dr·R'(p) on [B, T, M] float32 (contiguous), and the rational coefficient
    gradients Σ dr·∂R/∂a_i, Σ dr·∂R/∂b_j per adapter: one atomic per coefficient, adapter
    and program."""
    BLOCK_R: tl.constexpr = BLOCK_L // LINES_PER_ROW
    pid_r = tl.program_id(0)
    offs_l = tl.arange(0, BLOCK_L)
    slot = offs_l // LINES_PER_ROW
    t = offs_l % LINES_PER_ROW
    pos = pid_r * BLOCK_R + slot
    pos_ok = pos < B
    line_ok = pos_ok & (t < T)
    row = tl.load(order_ptr + pos, mask=pos_ok, other=0).to(tl.int64)
    line_adapter = tl.load(sorted_ids_ptr + pos, mask=pos_ok, other=-1)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    off = row[:, None] * T * M + t[:, None] * M + offs_m[None, :]
    ok = line_ok[:, None] & m_ok[None, :]
    dr = tl.load(dr_ptr + off, mask=ok, other=0.0)
    pv = tl.load(p_ptr + off, mask=ok, other=0.0)
    dp = tl.zeros([BLOCK_L, BLOCK_M], tl.float32)
    for j in range(0, BLOCK_R):
        pj = pid_r * BLOCK_R + j
        if pj < B:
            a = tl.load(sorted_ids_ptr + pj)
            a_prev = tl.load(sorted_ids_ptr + tl.maximum(pj - 1, 0))
            if (j == 0) | (a != a_prev):
                a64 = a.to(tl.int64)
                sel = ok & (line_adapter == a)[:, None]
                g = tl.where(sel, dr, 0.0)
                dx, r, dh, sh = rat_dx(pv, num_ptr + a64 * s_na, den_ptr + a64 * s_da, P1, Q, VERSION_B)
                rat_coef_grads_atomic(pv, g, r, dh, sh, den_ptr + a64 * s_da, dnum_ptr + a64 * P1,
                                      dden_ptr + a64 * Q, P1, Q, VERSION_B)
                dp += g * dx
    tl.store(dp_ptr + off, dp, mask=ok)


@triton.jit
def seg_outer_kernel(
    x_ptr, y_ptr, out_ptr, order_ptr, seg_ptr, num_ptr, den_ptr, prod_a_ptr, prod_b_ptr,
    T, K1, K2,
    s_xb, s_xt, s_xk, s_yb, s_yt, s_yk, s_oa, s_oi, s_oj, s_na, s_da,
    s_pa_a, s_pa_i, s_pa_c, s_pb_a, s_pb_c, s_pb_j,
    APPLY_R: tl.constexpr, ADD_PRODUCT: tl.constexpr, LINES_PER_ROW: tl.constexpr, TP: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    P1: tl.constexpr, Q: tl.constexpr, VERSION_B: tl.constexpr, PREC: tl.constexpr,
):
    """out[a, i, j] = Σ_{rows of adapter a} Σ_t f(x[row, t, i]) y[row, t, j]
                      (+ Σ_{c<T} prod_a[a, i, c] prod_b[a, c, j] when ADD_PRODUCT: dW_dp·W_poolᵀ for dW_down)."""
    BLOCK_R: tl.constexpr = BLOCK_L // LINES_PER_ROW
    a = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = offs_i < K1
    j_ok = offs_j < K2
    offs_l = tl.arange(0, BLOCK_L)
    slot = offs_l // LINES_PER_ROW
    t = offs_l % LINES_PER_ROW
    start = tl.load(seg_ptr + a)
    end = tl.load(seg_ptr + a + 1)
    acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    for p0 in range(start, end, BLOCK_R):
        pos = p0 + slot
        pos_ok = pos < end
        ok = pos_ok & (t < T)
        row = tl.load(order_ptr + pos, mask=pos_ok, other=0).to(tl.int64)
        xm = ok[:, None] & i_ok[None, :]
        x = tl.load(x_ptr + row[:, None] * s_xb + t[:, None] * s_xt + offs_i[None, :] * s_xk,
                    mask=xm, other=0.0).to(tl.float32)
        if APPLY_R:
            x = tl.where(xm, rat_forward(x, num_ptr + a * s_na, den_ptr + a * s_da, P1, Q, VERSION_B), 0.0)
        y = tl.load(y_ptr + row[:, None] * s_yb + t[:, None] * s_yt + offs_j[None, :] * s_yk,
                    mask=ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
        acc += dot_ff(tl.trans(x), y, PREC)
    if ADD_PRODUCT:
        offs_c = tl.arange(0, TP)
        c_ok = offs_c < T
        pa = tl.load(prod_a_ptr + a * s_pa_a + offs_i[:, None] * s_pa_i + offs_c[None, :] * s_pa_c,
                     mask=i_ok[:, None] & c_ok[None, :], other=0.0)
        pb = tl.load(prod_b_ptr + a * s_pb_a + offs_c[:, None] * s_pb_c + offs_j[None, :] * s_pb_j,
                     mask=c_ok[:, None] & j_ok[None, :], other=0.0)
        acc += dot_ff(pa, pb, PREC)
    tl.store(out_ptr + a * s_oa + offs_i[:, None] * s_oi + offs_j[None, :] * s_oj,
             cast_for(acc, out_ptr), mask=i_ok[:, None] & j_ok[None, :])


@triton.jit
def adapter_mm_kernel(
    x_ptr, y_ptr, out_ptr, used_ptr,
    NI, K, NJ, NJ_STORE,
    s_xa, s_xi, s_xk, s_ya, s_yk, s_yj, s_oa, s_oi, s_oj,
    BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr, PREC: tl.constexpr,
):
    """out[a, i, j] = Σ_k x[a, i, k] y[a, k, j] for adapters in use (j < NJ read, j < NJ_STORE
    stored; columns NJ..NJ_STORE are zero padding); zeros for adapters nobody used."""
    a = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.arange(0, BLOCK_J)
    i_ok = offs_i < NI
    j_ok = offs_j < NJ
    offs_bk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    if tl.load(used_ptr + a) != 0:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_bk
            k_ok = offs_k < K
            x = tl.load(x_ptr + a * s_xa + offs_i[:, None] * s_xi + offs_k[None, :] * s_xk,
                        mask=i_ok[:, None] & k_ok[None, :], other=0.0)
            y = tl.load(y_ptr + a * s_ya + offs_k[:, None] * s_yk + offs_j[None, :] * s_yj,
                        mask=k_ok[:, None] & j_ok[None, :], other=0.0)
            acc += dot_ff(x, y, PREC)
    tl.store(out_ptr + a * s_oa + offs_i[:, None] * s_oi + offs_j[None, :] * s_oj,
             cast_for(acc, out_ptr), mask=i_ok[:, None] & (offs_j < NJ_STORE)[None, :])


@triton.jit
def seg_sum_kernel(
    x_ptr, out_ptr, order_ptr, seg_ptr,
    T, D,
    s_xb, s_xt, s_xd, s_oa, s_ot, s_od,
    LINES_PER_ROW: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[a, t, :] = Σ_{rows of adapter a} x[row, t, :] (the anchor's gradient): one program
    per (adapter, d-tile) reduces its adapter's segment of sorted rows in registers and stores
    once. No atomics; adapters nobody used get exact zeros."""
    a = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, LINES_PER_ROW)
    ok = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    start = tl.load(seg_ptr + a)
    end = tl.load(seg_ptr + a + 1)
    acc = tl.zeros([LINES_PER_ROW, BLOCK_D], tl.float32)
    for pos in range(start, end):
        row = tl.load(order_ptr + pos).to(tl.int64)
        acc += tl.load(x_ptr + row * s_xb + offs_t[:, None] * s_xt + offs_d[None, :] * s_xd,
                       mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + a * s_oa + offs_t[:, None] * s_ot + offs_d[None, :] * s_od, cast_for(acc, out_ptr), mask=ok)

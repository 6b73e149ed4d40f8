"""Backward streaming kernels of the prompt generator (design.md §4), pooled-hidden form.

With dPh = dp·W_downᵀ [T, d] given (kernels/lines.py), per token n and soft token t:

    dA[n,t] = H[n]·dPh[t]
    dU[n,t] = A[n,t] (dA[n,t] − δ_t),      δ_t = Σ_n A[n,t] dA[n,t]
    dH[n]   = Σ_t A[n,t] dPh[t] + Σ_t dU[n,t] W_dp[:,t]
    dW_dp  += Hᵀ dU                        (then dW_down += dW_dp W_poolᵀ, dW_pool = W_downᵀ dW_dp)

A is recomputed from U = H·W_dp and the stored row statistics (max, 1/sum), never stored by
the forward. δ is summed from the very dA values dU uses. Mathematically δ_t = Ph[t]·dPh[t]
would avoid a pass, but in a saturated softmax (|H| ~ 1e3, A one-hot) dA[n*] − δ must cancel
exactly; computed from Ph it leaves rounding noise of order eps·|H|·|dPh|, which W_pool and H
then amplify into the weight gradients (seen: 600× the reference's float32 error).

pool_bwd_scores_kernel, per (row, tile of BLOCK_N tokens): one pass over d forms U and dA,
stores A and dA [B, N, T] float32 (8·T bytes per token) and adds the tile's Σ A·dA into δ
with one atomic per soft token. pool_bwd_kernel, same grid: dU from them, then one pass over
d writes dH and reduces the tile's Hᵀ·dU in registers, adding it with one atomic per element
per program into a float32 dW_dp [A, d, TP].
"""
import triton
import triton.language as tl

from .common import cast_for, dot_ff, dot_fh, dot_hf, row_adapter


@triton.jit
def pool_bwd_scores_kernel(
    h_ptr, mask_ptr, ids_ptr, wdp_ptr, dph_ptr, stat_m_ptr, stat_linv_ptr, attn_ptr, da_ptr, delta_ptr,
    N, D, T,
    s_hb, s_hn, s_hd, s_mb, s_mn, s_wa, s_dpb,
    HAS_IDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TP: tl.constexpr,
    SPLIT: tl.constexpr, PREC: tl.constexpr,
):
    """h [B, N, D]; wdp [A, D, TP] float32; dph [B, T, D] float32; stats, delta [B, T];
    attn, da [B, N, T] float32 (outputs)."""
    b = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    a = row_adapter(ids_ptr, b, HAS_IDS)
    offs_t = tl.arange(0, TP)
    t_ok = offs_t < T
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    keep = tl.load(mask_ptr + b * s_mb + offs_n * s_mn, mask=n_ok, other=0) != 0
    live = n_ok & keep  # masked tokens are never read (they may hold NaN)
    big_m = tl.load(stat_m_ptr + b * T + offs_t, mask=t_ok, other=0.0)
    l_inv = tl.load(stat_linv_ptr + b * T + offs_t, mask=t_ok, other=0.0)
    offs_bd = tl.arange(0, BLOCK_D)
    h_row = h_ptr + b * s_hb
    w_base = wdp_ptr + a * s_wa
    g_base = dph_ptr + b * s_dpb
    u = tl.zeros([BLOCK_N, TP], tl.float32)
    da = tl.zeros([BLOCK_N, TP], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_bd
        d_ok = offs_d < D
        h = tl.load(h_row + offs_n[:, None] * s_hn + offs_d[None, :] * s_hd,
                    mask=live[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_base + offs_d[:, None] * TP + offs_t[None, :], mask=d_ok[:, None], other=0.0)
        g = tl.load(g_base + offs_t[None, :] * D + offs_d[:, None], mask=d_ok[:, None] & t_ok[None, :], other=0.0)
        u += dot_hf(h, w, SPLIT, PREC)
        da += dot_hf(h, g, SPLIT, PREC)
    ok = keep[:, None] & t_ok[None, :]
    # Masked tokens may hold any U: select before exp so that nothing overflows.
    attn = tl.where(ok, tl.exp(tl.where(ok, u - big_m[None, :], 0.0)) * l_inv[None, :], 0.0)
    da = tl.where(ok, da, 0.0)
    out_off = b * N * T + offs_n[:, None] * T + offs_t[None, :]
    st = n_ok[:, None] & t_ok[None, :]
    tl.store(attn_ptr + out_off, attn, mask=st)
    tl.store(da_ptr + out_off, da, mask=st)
    tl.atomic_add(delta_ptr + b * T + offs_t, tl.sum(attn * da, axis=0), mask=t_ok)


@triton.jit
def pool_bwd_kernel(
    h_ptr, mask_ptr, ids_ptr, wdp_ptr, dph_ptr, attn_ptr, da_ptr, delta_ptr, dh_ptr, dwdp_ptr,
    N, D, T,
    s_hb, s_hn, s_hd, s_mb, s_mn, s_wa, s_gb, s_gn, s_gd, s_dpb,
    HAS_IDS: tl.constexpr, STORE_DH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TP: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
):
    """dh [B, N, D] (strides s_g*, hidden dtype); dwdp [A, D, TP] float32 (atomic adds)."""
    b = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    a = row_adapter(ids_ptr, b, HAS_IDS)
    offs_t = tl.arange(0, TP)
    t_ok = offs_t < T
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    live = n_ok & (tl.load(mask_ptr + b * s_mb + offs_n * s_mn, mask=n_ok, other=0) != 0)
    st = n_ok[:, None] & t_ok[None, :]
    in_off = b * N * T + offs_n[:, None] * T + offs_t[None, :]
    attn = tl.load(attn_ptr + in_off, mask=st, other=0.0)
    da = tl.load(da_ptr + in_off, mask=st, other=0.0)
    delta = tl.load(delta_ptr + b * T + offs_t, mask=t_ok, other=0.0)
    du = attn * (da - delta[None, :])
    du_t = tl.trans(du)
    offs_bd = tl.arange(0, BLOCK_D)
    h_row = h_ptr + b * s_hb
    w_base = wdp_ptr + a * s_wa
    g_base = dph_ptr + b * s_dpb
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_bd
        d_ok = offs_d < D
        h = tl.load(h_row + offs_n[:, None] * s_hn + offs_d[None, :] * s_hd,
                    mask=live[:, None] & d_ok[None, :], other=0.0)
        if STORE_DH:
            g_t = tl.load(g_base + offs_t[:, None] * D + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            w_t = tl.load(w_base + offs_t[:, None] + offs_d[None, :] * TP, mask=d_ok[None, :], other=0.0)
            dh = dot_ff(attn, g_t, PREC) + dot_ff(du, w_t, PREC)
            tl.store(dh_ptr + b * s_gb + offs_n[:, None] * s_gn + offs_d[None, :] * s_gd,
                     cast_for(dh, dh_ptr), mask=n_ok[:, None] & d_ok[None, :])
        dw = dot_fh(du_t, h, SPLIT, PREC)  # [TP, BLOCK_D]
        tl.atomic_add(dwdp_ptr + a * s_wa + offs_t[:, None] + offs_d[None, :] * TP, dw,
                      mask=t_ok[:, None] & d_ok[None, :])

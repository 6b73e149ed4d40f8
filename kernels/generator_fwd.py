"""Forward streaming kernels of the prompt generator (design.md §4), in the pooled-hidden form.

Since X = H·W_down is linear in H, the generator factors as

    U  = H · W_dp          W_dp = W_down·W_pool  [d, T], per adapter, float32
    A  = masked softmax of U over the instruction tokens (per soft token t)
    Ph = Aᵀ · H            pooled hidden states [T, d]
    p  = Ph · W_down       [T, m]        (kernels/lines.py)

which is the same math as the paper's X-first order, but the per-token work is two thin
products with d×T operands instead of a d×m GEMM: the per-token FLOPs drop from 2·d·m to
~4·d·T, and the streaming kernel is bound by reading H, not by tensor-core throughput (with
m = 320 the X-first order is compute-bound on an H100 even with perfect bf16 tensor cores).

pool_fwd_kernel: one program per (row, split of N). It walks its split in tiles of BLOCK_N
tokens; pass 1 over d forms U_tile, an online softmax update (flash-attention style running
max and sum per soft token) follows, pass 2 over d adds e_tileᵀ·H_tile into the split's
partial accumulator, which lives in a global float32 buffer [B, S, T, d]: it is far too big
for registers at d = 4096 but stays in L2, and pass 2 re-reads the tile of H that pass 1 just
brought in (L2 hit). H is read from HBM once.
combine_kernel: merges the S partials of each row (flash-decoding combine), normalises, and
stores Ph [B, T, d] plus the final softmax statistics the backward needs.
"""
import triton
import triton.language as tl

from .common import dot_fh, dot_hf, row_adapter


@triton.jit
def pool_split(
    h_row, mask_row, w_base, p_base, n_start, n_end, D, T, s_hn, s_hd, s_mn,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TP: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
):
    """Stream tokens n_start..n_end of one row of H once: the online masked softmax of
    U = H·W_dp per soft token and the partial Aᵀ·H accumulated at p_base ([T, D] float32,
    contiguous D). Returns the split's running max and sum per soft token ([TP] each)."""
    offs_t = tl.arange(0, TP)
    t_ok = offs_t < T
    offs_bd = tl.arange(0, BLOCK_D)
    m_run = tl.full([TP], float("-inf"), tl.float32)
    l_run = tl.zeros([TP], tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        keep = tl.load(mask_row + offs_n * s_mn, mask=n_ok, other=0) != 0
        # Masked tokens are never read: whatever they hold (NaN included) has no influence.
        live = n_ok & keep
        u = tl.zeros([BLOCK_N, TP], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_bd
            d_ok = offs_d < D
            h = tl.load(h_row + offs_n[:, None] * s_hn + offs_d[None, :] * s_hd,
                        mask=live[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_base + offs_d[:, None] * TP + offs_t[None, :], mask=d_ok[:, None], other=0.0)
            u += dot_hf(h, w, SPLIT, PREC)
        u = tl.where(keep[:, None], u, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(u, axis=0))
        # An all-masked prefix has max -inf: shift by 0 so exp gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_safe)
        e = tl.where(keep[:, None], tl.exp(u - m_safe[None, :]), 0.0)
        l_run = l_run * alpha + tl.sum(e, axis=0)
        m_run = m_new
        e_t = tl.trans(e)
        # Rows of the partial that hold data: none before this split's first tile.
        t_have = tl.where(n0 != n_start, T, 0)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_bd
            d_ok = offs_d < D
            h = tl.load(h_row + offs_n[:, None] * s_hn + offs_d[None, :] * s_hd,
                        mask=live[:, None] & d_ok[None, :], other=0.0)
            contrib = dot_fh(e_t, h, SPLIT, PREC)
            p_ptrs = p_base + offs_t[:, None] * D + offs_d[None, :]
            prev = tl.load(p_ptrs, mask=(offs_t < t_have)[:, None] & d_ok[None, :], other=0.0)
            tl.store(p_ptrs, prev * alpha[:, None] + contrib, mask=t_ok[:, None] & d_ok[None, :])
        # The next tile reads back what other threads of this program stored.
        tl.debug_barrier()
    return m_run, l_run


@triton.jit
def merge_splits(
    p_row, stat_row, stat_l_row, S, D, T, s_ps, offs_d, d_ok, BLOCK_D: tl.constexpr, TP: tl.constexpr,
    COHERENT: tl.constexpr,
):
    """The flash-decoding combine of one row's S partials over the columns offs_d:
    (Σ_s e^(m_s−M) part_s / L  [TP, BLOCK_D], M [TP], 1/L [TP]). A split without tiles
    (m_s = −inf) is skipped; an all-masked row (L = 0) pools to 0 (design.md §3). COHERENT:
    read other programs' stores of this launch past L1 (.cg), which is not coherent across SMs."""
    offs_t = tl.arange(0, TP)
    t_ok = offs_t < T
    big_m = tl.full([TP], float("-inf"), tl.float32)
    big_l = tl.zeros([TP], tl.float32)
    acc = tl.zeros([TP, BLOCK_D], tl.float32)
    for j in range(0, S):
        if COHERENT:
            m_s = tl.load(stat_row + j * TP + offs_t, cache_modifier=".cg")
            l_s = tl.load(stat_l_row + j * TP + offs_t, cache_modifier=".cg")
        else:
            m_s = tl.load(stat_row + j * TP + offs_t)
            l_s = tl.load(stat_l_row + j * TP + offs_t)
        m_new = tl.maximum(big_m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        c_old = tl.exp(big_m - m_safe)
        c_s = tl.exp(m_s - m_safe)
        has = t_ok & (m_s != float("-inf"))
        p_ptrs = p_row + j * s_ps + offs_t[:, None] * D + offs_d[None, :]
        if COHERENT:
            part = tl.load(p_ptrs, mask=has[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
        else:
            part = tl.load(p_ptrs, mask=has[:, None] & d_ok[None, :], other=0.0)
        acc = acc * c_old[:, None] + part * c_s[:, None]
        big_l = big_l * c_old + l_s * c_s
        big_m = m_new
    l_inv = tl.where(big_l > 0, 1.0 / tl.where(big_l > 0, big_l, 1.0), 0.0)
    return acc * l_inv[:, None], big_m, l_inv


@triton.jit
def pool_fwd_kernel(
    h_ptr, mask_ptr, ids_ptr, wdp_ptr, part_ptr, stat_m_ptr, stat_l_ptr,
    N, D, T, TILES_PER_SPLIT,
    s_hb, s_hn, s_hd, s_mb, s_mn, s_wa, s_pb, s_ps, s_sb,
    HAS_IDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TP: tl.constexpr,
    SPLIT: tl.constexpr, PREC: tl.constexpr,
):
    """h [B, N, D]; mask [B, N] uint8; wdp [A, D, TP] float32 (columns >= T are zero);
    part [B, S, T, D] float32 (contiguous D); stats [B, S, TP] float32."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    a = row_adapter(ids_ptr, b, HAS_IDS)
    n_start = s * TILES_PER_SPLIT * BLOCK_N
    n_end = tl.minimum(N, n_start + TILES_PER_SPLIT * BLOCK_N)
    m_run, l_run = pool_split(h_ptr + b * s_hb, mask_ptr + b * s_mb, wdp_ptr + a * s_wa,
                              part_ptr + b * s_pb + s * s_ps, n_start, n_end, D, T, s_hn, s_hd, s_mn,
                              BLOCK_N, BLOCK_D, TP, SPLIT, PREC)
    offs_t = tl.arange(0, TP)
    tl.store(stat_m_ptr + b * s_sb + s * TP + offs_t, m_run)
    tl.store(stat_l_ptr + b * s_sb + s * TP + offs_t, l_run)


@triton.jit
def combine_kernel(
    part_ptr, stat_m_ptr, stat_l_ptr, ph_ptr, m_out_ptr, linv_out_ptr,
    S, D, T,
    s_pb, s_ps, s_sb, s_phb,
    BLOCK_D: tl.constexpr, TP: tl.constexpr,
):
    """Merge S partials per row: Ph [B, T, D] = Σ_s e^(m_s−M) part_s / L; M, 1/L -> [B, T]."""
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_t = tl.arange(0, TP)
    t_ok = offs_t < T
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    ph, big_m, l_inv = merge_splits(part_ptr + b * s_pb, stat_m_ptr + b * s_sb, stat_l_ptr + b * s_sb, S, D, T,
                                    s_ps, offs_d, d_ok, BLOCK_D, TP, False)
    tl.store(ph_ptr + b * s_phb + offs_t[:, None] * D + offs_d[None, :], ph, mask=t_ok[:, None] & d_ok[None, :])
    if pid_d == 0:
        tl.store(m_out_ptr + b * T + offs_t, tl.where(big_m == float("-inf"), 0.0, big_m), mask=t_ok)
        tl.store(linv_out_ptr + b * T + offs_t, l_inv, mask=t_ok)

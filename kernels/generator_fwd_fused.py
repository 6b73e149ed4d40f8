"""One-launch inference forward of the prompt generator (design.md §4).

The same math as generator_fwd.py + lines.py (U = H·W_dp, masked online softmax, Ph = Aᵀ·H,
p = Ph·W_down, P = anchor + scale·R(p)·W_up), in one launch for a mixed batch:

* one program per (row, split of N) streams its split of H once (flash-decoding), keeping the
  split's running max / sum per soft token and its partial Aᵀ·H in a float32 buffer
  [B, S, T, d] (L2-resident, re-read right away as in pool_fwd_kernel);
* every program then stores its statistics and bumps the row's arrival counter (int32 [B],
  zero before the launch) with an acq_rel atomic; the program that sees S − 1 arrived before
  it is the last one of its row. Its acquire pairs with the release of every earlier arriver,
  so the partials and statistics they stored before their atomic are visible to its loads.
  It resets the counter to 0 (a reused counter buffer is ready for the next launch), merges
  the S partials, normalises, and runs the epilogue: p = Ph·W_down[a], R(p), G = R(p)·W_up[a],
  P = anchor[a] + scale[a]·G, stored in the hidden dtype.

The epilogue is one program per row: its two [T, d]×[d, m] products are not spread over the
GPU as the multi-launch path's line GEMMs are. That is the price of the saved launches; the
host policy (kernels/launch.py ``fused_forward_pays``) weighs the two.

Scratch per row, in the last arriver: Ph overwrites split 0 of the partial buffer, and R(p)
goes to a small float32 buffer [B, TP, m]; a CTA barrier separates each write from the reads of
other threads of the same program.
"""
import triton
import triton.language as tl

from .common import cast_for, dot_ff, row_adapter
from .generator_fwd import merge_splits, pool_split
from .rational_tl import rat_forward


@triton.jit
def generator_fwd_fused_kernel(
    h_ptr, mask_ptr, ids_ptr, wdp_ptr, part_ptr, stat_m_ptr, stat_l_ptr, count_ptr, rp_ptr,
    wd_ptr, wu_ptr, num_ptr, den_ptr, anchor_ptr, scale_ptr, out_ptr,
    N, D, T, M, S, TILES_PER_SPLIT,
    s_hb, s_hn, s_hd, s_mb, s_mn, s_wa, s_pb, s_ps, s_sb,
    s_wda, s_wdd, s_wdm, s_wua, s_wum, s_wud, s_na, s_da, s_aa, s_at, s_ad, s_sa, s_ob, s_ot, s_od,
    HAS_IDS: tl.constexpr, ANCHOR: tl.constexpr, SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, TP: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
    P1: tl.constexpr, Q: tl.constexpr, VERSION_B: tl.constexpr,
):
    """h [B, N, D]; mask [B, N] uint8; wdp [A, D, TP] float32 (columns >= T zero); part
    [B, S, T, D] float32 (contiguous D); stats [B, S, TP] float32; count [B] int32, zero;
    rp [B, TP, M] float32 (contiguous); wd [A, D, M]; wu [A, M, D]; num [A, P1]; den [A, Q];
    anchor [A, T, D]; scale [A]; out [B, T, D] in the hidden dtype. Grid (B, S)."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    a = row_adapter(ids_ptr, b, HAS_IDS)
    offs_t = tl.arange(0, TP)
    t_ok = offs_t < T
    offs_bd = tl.arange(0, BLOCK_D)

    # ---- stream this split of H once: online masked softmax and partial Aᵀ·H
    n_start = s * TILES_PER_SPLIT * BLOCK_N
    n_end = tl.minimum(N, n_start + TILES_PER_SPLIT * BLOCK_N)
    p_row = part_ptr + b * s_pb
    m_run, l_run = pool_split(h_ptr + b * s_hb, mask_ptr + b * s_mb, wdp_ptr + a * s_wa, p_row + s * s_ps,
                              n_start, n_end, D, T, s_hn, s_hd, s_mn, BLOCK_N, BLOCK_D, TP, SPLIT, PREC)
    tl.store(stat_m_ptr + b * s_sb + s * TP + offs_t, m_run)
    tl.store(stat_l_ptr + b * s_sb + s * TP + offs_t, l_run)

    # ---- arrival: every thread's stores precede the release of the counter update
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + b, 1, sem="acq_rel")
    if arrived == S - 1:
        # Last of its row: no other program of this launch touches the counter again.
        tl.atomic_xchg(count_ptr + b, 0, sem="relaxed")
        tl.debug_barrier()
        # Merge the S partials (flash-decoding combine); Ph -> split 0 of the partial buffer.
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_bd
            d_ok = offs_d < D
            ph, _, _ = merge_splits(p_row, stat_m_ptr + b * s_sb, stat_l_ptr + b * s_sb, S, D, T, s_ps, offs_d,
                                    d_ok, BLOCK_D, TP, True)
            tl.debug_barrier()  # every thread has read split 0 of this chunk before it is overwritten
            tl.store(p_row + offs_t[:, None] * D + offs_d[None, :], ph, mask=t_ok[:, None] & d_ok[None, :])
        tl.debug_barrier()
        # p = Ph·W_down[a], R(p) -> rp, BLOCK_M columns at a time.
        offs_bm = tl.arange(0, BLOCK_M)
        rp_row = rp_ptr + b * TP * M
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + offs_bm
            m_ok = offs_m < M
            pacc = tl.zeros([TP, BLOCK_M], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_bd
                d_ok = offs_d < D
                ph = tl.load(p_row + offs_t[:, None] * D + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                             other=0.0, cache_modifier=".cg")
                wd = tl.load(wd_ptr + a * s_wda + offs_d[:, None] * s_wdd + offs_m[None, :] * s_wdm,
                             mask=d_ok[:, None] & m_ok[None, :], other=0.0)
                pacc += dot_ff(ph, wd, PREC)
            r = rat_forward(pacc, num_ptr + a * s_na, den_ptr + a * s_da, P1, Q, VERSION_B)
            tl.store(rp_row + offs_t[:, None] * M + offs_m[None, :], r, mask=m_ok[None, :])
        tl.debug_barrier()
        # P = anchor[a] + scale[a]·R(p)·W_up[a], BLOCK_D columns at a time.
        if SCALE:
            sc = tl.load(scale_ptr + a * s_sa).to(tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_bd
            d_ok = offs_d < D
            g = tl.zeros([TP, BLOCK_D], tl.float32)
            for m0 in range(0, M, BLOCK_M):
                offs_m = m0 + offs_bm
                m_ok = offs_m < M
                r = tl.load(rp_row + offs_t[:, None] * M + offs_m[None, :], mask=m_ok[None, :], other=0.0)
                wu = tl.load(wu_ptr + a * s_wua + offs_m[:, None] * s_wum + offs_d[None, :] * s_wud,
                             mask=m_ok[:, None] & d_ok[None, :], other=0.0)
                g += dot_ff(r, wu, PREC)
            o_mask = t_ok[:, None] & d_ok[None, :]
            if SCALE:
                g = g * sc
            if ANCHOR:
                g += tl.load(anchor_ptr + a * s_aa + offs_t[:, None] * s_at + offs_d[None, :] * s_ad,
                             mask=o_mask, other=0.0).to(tl.float32)
            o_ptrs = out_ptr + b * s_ob + offs_t[:, None] * s_ot + offs_d[None, :] * s_od
            tl.store(o_ptrs, cast_for(g, out_ptr), mask=o_mask)

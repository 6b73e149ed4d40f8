"""torch.autograd.Function wiring the generator kernels, and ``triton_prompt_generator``.

Forward launches (design.md §3 shapes; B rows, N tokens, d hidden, m bottleneck, T soft tokens):
  1. adapter_mm      W_dp[a] = W_down[a]·W_pool[a]  -> [A, d, 16] float32, adapters in use only
  2. pool_fwd        per (row, split): online masked softmax of H·W_dp, partial Aᵀ·H
  3. combine         Ph [B, T, d] float32, row stats (max, 1/sum) [B, T]
  4. lines_mm GEMM   p  = Ph·W_down[a]           [B, T, m] float32 (saved; split over K if few tiles)
  5. lines_mm OUT    P  = R(p)·W_up[a]           [B, T, d] hidden dtype
                     (anchored form: P = B[a] + s[a]·R(p)·W_up[a], fused into the store)
Backward: lines_mm GEMM (dr = dP·W_upᵀ), rat_bwd (dp = dr·R'(p), rational coefficient grads),
lines_mm GEMM (dPh = dp·W_downᵀ), pool_bwd_scores (A, dA, δ; [B, N, T] float32 scratch),
pool_bwd (dH, dW_dp), seg_outer (dW_up; dW_down incl. dW_dp·W_poolᵀ), adapter_mm
(dW_pool = W_downᵀ·dW_dp), and in the anchored form seg_sum (dB[a] = Σ dP over adapter a's
rows) with the generator's incoming gradient scaled by s[a]. H is read once by the forward and
twice by the backward.

Saved between passes: W_dp [A, d, 16], Ph [B, T, d], p [B, T, m] and two [B, T] statistics,
all float32: O(B·T·(d+m)), never O(B·N·T). Weights may have another dtype than hidden: every
kernel loads and converts in registers, so there is no host-side cast (no copy of the weights).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import launch as L
from .generator_bwd import pool_bwd_kernel, pool_bwd_scores_kernel
from .generator_fwd import combine_kernel, pool_fwd_kernel
from .lines import (MODE_GEMM, MODE_OUT, adapter_mm_kernel, lines_mm_kernel, rat_bwd_kernel, seg_outer_kernel,
                    seg_sum_kernel)

__all__ = ["triton_prompt_generator", "PromptGeneratorFunction"]


def _lines_mm(mode, x, w, w_strides, out_shape, out_dtype, order, sids, num, den, batch, tokens, k, nout,
              version_b, prec, dev, anchor=None, scale=None):
    """out [B, T, nout] = f(x [B, T, k]) · W[a(row)]; W strides (k, nout) given explicitly.

    Splits K across programs (float32 atomics into a zeroed buffer) when the line blocks
    alone are too few to fill the GPU: p = Ph·W_down has K = d = 4096 but only
    cdiv(B·T, 64)·cdiv(m, 64) output tiles (10 at B = 32, m = 320)."""
    tpl = L.lines_per_row(tokens)
    row_blocks = L.triton.cdiv(batch, L.LINES_BLOCK // tpl)
    col_blocks = L.triton.cdiv(nout, L.LINES_BLOCK_OUT)
    k_splits, per_split = L.choose_k_splits(row_blocks * col_blocks, k, dev)
    atomic = k_splits > 1 and mode == MODE_GEMM and anchor is None and scale is None
    if not atomic:
        k_splits, per_split = 1, max(k, 1)
    if atomic:
        out = torch.zeros(*out_shape, dtype=torch.float32, device=dev)
    else:
        out = L.empty(*out_shape, dtype=out_dtype, device=dev)
    a_arg = anchor if anchor is not None else x  # never read without ANCHOR / SCALE
    s_arg = scale if scale is not None else x
    a_strides = (anchor.stride(0), anchor.stride(1), anchor.stride(2)) if anchor is not None else (0, 0, 0)
    L.launch(lines_mm_kernel, (row_blocks, col_blocks, k_splits),
             [x, w, out, order, sids, num, den, a_arg, s_arg, batch, tokens, k, nout, per_split,
              x.stride(0), x.stride(1), x.stride(2), w.stride(0), w_strides[0], w_strides[1],
              out.stride(0), out.stride(1), out.stride(2), num.stride(0), den.stride(0),
              *a_strides, scale.stride(0) if scale is not None else 0],
             dict(MODE=mode, ATOMIC=atomic, TPL=tpl, BLOCK_L=L.LINES_BLOCK, BLOCK_K=L.LINES_BLOCK_K,
                  BLOCK_NO=L.LINES_BLOCK_OUT, P1=num.shape[1], Q=den.shape[1], VERSION_B=version_b, PREC=prec,
                  ANCHOR=anchor is not None, SCALE=scale is not None))
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _adapter_mm(x, x_strides, y, y_strides, out, used, ni, k, nj, nj_store, prec):
    """out[a, i, j] = Σ_k x[a, i, k] y[a, k, j]; strides given as (adapter, row, col)."""
    grid = (out.shape[0], L.triton.cdiv(ni, L.LINES_BLOCK))
    L.launch(adapter_mm_kernel, grid,
             [x, y, out, used, ni, k, nj, nj_store, *x_strides, *y_strides,
              out.stride(0), out.stride(1), out.stride(2)],
             dict(BLOCK_I=L.LINES_BLOCK, BLOCK_K=L.LINES_BLOCK_K, BLOCK_J=L.TP_DOT, PREC=prec))


def _seg_outer(x, y, out, order, seg, num, den, e1, e1_strides, e2, e2_strides, tokens,
               apply_r, extra, version_b, prec):
    grid = (out.shape[0], L.triton.cdiv(out.shape[1], L.LINES_BLOCK_OUT), L.triton.cdiv(out.shape[2], L.LINES_BLOCK_OUT))
    L.launch(seg_outer_kernel, grid,
             [x, y, out, order, seg, num, den, e1, e2, tokens, out.shape[1], out.shape[2],
              x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
              out.stride(0), out.stride(1), out.stride(2), num.stride(0), den.stride(0),
              *e1_strides, *e2_strides],
             dict(APPLY_R=apply_r, EXTRA=extra, TPL=L.lines_per_row(tokens), TC=L.TP_DOT,
                  BLOCK_L=L.LINES_BLOCK, BLOCK_I=L.LINES_BLOCK_OUT, BLOCK_J=L.LINES_BLOCK_OUT,
                  P1=num.shape[1], Q=den.shape[1], VERSION_B=version_b, PREC=prec))


class PromptGeneratorFunction(torch.autograd.Function):
    """Autograd wrapper; inputs are assumed validated by iapt_fast.functional."""

    @staticmethod
    def forward(ctx, hidden, mask, w_down, w_pool, rat_num, rat_den, w_up, adapter_ids, version, num_splits,
                anchor, anchor_scale):
        batch, seq, dim = hidden.shape
        n_adapters, _, bottleneck = w_down.shape
        tokens = w_pool.shape[2]
        dev = hidden.device
        f32 = dict(dtype=torch.float32, device=dev)
        cfg = L.precision(hidden.dtype)
        version_b = version == "B"
        has_ids = adapter_ids is not None and n_adapters > 1
        if has_ids:
            ids = adapter_ids.contiguous()
            sids, order = torch.sort(ids, stable=True)
            # index_put, not bincount: bincount syncs with the host on CUDA.
            used = torch.zeros(n_adapters, dtype=torch.int32, device=dev)
            used[ids] = 1
        else:
            ids = torch.zeros(max(batch, 1), dtype=torch.long, device=dev)
            sids = torch.zeros(batch, dtype=torch.long, device=dev)
            order = torch.arange(batch, dtype=torch.long, device=dev)
            used = torch.ones(n_adapters, dtype=torch.int32, device=dev)
        mask_u8 = mask.to(torch.uint8)
        rat_num = rat_num.contiguous()
        rat_den = rat_den.contiguous()

        wdp = L.empty(n_adapters, dim, L.TP_DOT, **f32)
        _adapter_mm(w_down, (w_down.stride(0), w_down.stride(1), w_down.stride(2)),
                    w_pool, (w_pool.stride(0), w_pool.stride(1), w_pool.stride(2)),
                    wdp, used, dim, bottleneck, tokens, L.TP_DOT, cfg["prec"])

        splits, per_split = L.choose_splits(batch, seq, dev, num_splits)
        part = L.empty(batch, splits, tokens, dim, **f32)
        stat_m = L.empty(batch, splits, L.TP_DOT, **f32)
        stat_l = L.empty(batch, splits, L.TP_DOT, **f32)
        bd = L.block_d(dim)
        L.launch(pool_fwd_kernel, (batch, splits),
                 [hidden, mask_u8, ids, wdp, part, stat_m, stat_l, seq, dim, tokens, per_split,
                  hidden.stride(0), hidden.stride(1), hidden.stride(2), mask_u8.stride(0), mask_u8.stride(1),
                  wdp.stride(0), part.stride(0), part.stride(1), stat_m.stride(0)],
                 dict(HAS_IDS=has_ids, BLOCK_N=L.STREAM_BLOCK_N, BLOCK_D=bd, TP=L.TP_DOT,
                      SPLIT=cfg["fwd_split"], PREC=cfg["prec"]))
        pooled = L.empty(batch, tokens, dim, **f32)
        row_m = L.empty(batch, tokens, **f32)
        row_linv = L.empty(batch, tokens, **f32)
        if splits == 0:  # N == 0: every row is empty and pools to zero
            pooled.zero_(), row_m.zero_(), row_linv.zero_()
        else:
            L.launch(combine_kernel, (batch, L.triton.cdiv(dim, bd)),
                     [part, stat_m, stat_l, pooled, row_m, row_linv, splits, dim, tokens,
                      part.stride(0), part.stride(1), stat_m.stride(0), pooled.stride(0)],
                     dict(BLOCK_D=bd, TP=L.TP_DOT))
        del part, stat_m, stat_l

        p = _lines_mm(MODE_GEMM, pooled, w_down, (w_down.stride(1), w_down.stride(2)), (batch, tokens, bottleneck),
                      torch.float32, order, sids, rat_num, rat_den, batch, tokens, dim, bottleneck, version_b,
                      cfg["prec"], dev)
        out = _lines_mm(MODE_OUT, p, w_up, (w_up.stride(1), w_up.stride(2)), (batch, tokens, dim), hidden.dtype,
                        order, sids, rat_num, rat_den, batch, tokens, bottleneck, dim, version_b, cfg["prec"], dev,
                        anchor=anchor, scale=anchor_scale)

        ctx.save_for_backward(hidden, mask_u8, ids, sids, order, used, wdp, pooled, p, row_m, row_linv,
                              w_down, w_pool, rat_num, rat_den, w_up, anchor_scale)
        ctx.meta = (has_ids, version_b, cfg, anchor is not None, anchor.dtype if anchor is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (hidden, mask_u8, ids, sids, order, used, wdp, pooled, p, row_m, row_linv,
         w_down, w_pool, rat_num, rat_den, w_up, anchor_scale) = ctx.saved_tensors
        has_ids, version_b, cfg, has_anchor, anchor_dtype = ctx.meta
        batch, seq, dim = hidden.shape
        n_adapters, _, bottleneck = w_down.shape
        tokens = w_pool.shape[2]
        dev = hidden.device
        f32 = dict(dtype=torch.float32, device=dev)
        prec = cfg["prec"]
        need = ctx.needs_input_grad
        wdt = w_down.dtype
        seg = torch.searchsorted(sids, torch.arange(n_adapters + 1, device=dev, dtype=sids.dtype))
        grad_anchor = None
        if has_anchor and need[10]:
            grad_anchor = L.empty(n_adapters, tokens, dim, dtype=anchor_dtype, device=dev)
            bd = L.block_d(dim)
            L.launch(seg_sum_kernel, (n_adapters, L.triton.cdiv(dim, bd)),
                     [grad_out, grad_anchor, order, seg, tokens, dim, grad_out.stride(0), grad_out.stride(1),
                      grad_out.stride(2), grad_anchor.stride(0), grad_anchor.stride(1), grad_anchor.stride(2)],
                     dict(TPL=L.lines_per_row(tokens), BLOCK_D=bd))
        if anchor_scale is not None:
            # The generator term is s·G: its weights see s·dP (a [B, T, d] float32 scratch).
            grad_out = grad_out.float() * anchor_scale.float()[ids[:batch]][:, None, None]

        dnum = torch.zeros(n_adapters, rat_num.shape[1], **f32)
        dden = torch.zeros(n_adapters, rat_den.shape[1], **f32)
        dr = _lines_mm(MODE_GEMM, grad_out, w_up, (w_up.stride(2), w_up.stride(1)), (batch, tokens, bottleneck),
                       torch.float32, order, sids, rat_num, rat_den, batch, tokens, dim, bottleneck, version_b, prec, dev)
        dp = L.empty(batch, tokens, bottleneck, **f32)
        tpl = L.lines_per_row(tokens)
        L.launch(rat_bwd_kernel, (L.triton.cdiv(batch, L.LINES_BLOCK // tpl), L.triton.cdiv(bottleneck, L.LINES_BLOCK_OUT)),
                 [dr, p, dp, order, sids, rat_num, rat_den, dnum, dden, batch, tokens, bottleneck,
                  rat_num.stride(0), rat_den.stride(0)],
                 dict(TPL=tpl, BLOCK_L=L.LINES_BLOCK, BLOCK_M=L.LINES_BLOCK_OUT, P1=rat_num.shape[1], Q=rat_den.shape[1],
                      VERSION_B=version_b))
        del dr
        dpooled = _lines_mm(MODE_GEMM, dp, w_down, (w_down.stride(2), w_down.stride(1)), (batch, tokens, dim),
                            torch.float32, order, sids, rat_num, rat_den, batch, tokens, bottleneck, dim, version_b,
                            prec, dev)
        delta = torch.zeros(batch, tokens, **f32)

        dwdp = torch.zeros(n_adapters, dim, L.TP_DOT, **f32)
        attn = L.empty(batch, seq, tokens, **f32)
        dattn = L.empty(batch, seq, tokens, **f32)
        grid = (batch, L.triton.cdiv(seq, L.STREAM_BLOCK_N))
        stream = dict(HAS_IDS=has_ids, BLOCK_N=L.STREAM_BLOCK_N, BLOCK_D=L.block_d(dim), TP=L.TP_DOT,
                      SPLIT=cfg["bwd_split"], PREC=prec)
        L.launch(pool_bwd_scores_kernel, grid,
                 [hidden, mask_u8, ids, wdp, dpooled, row_m, row_linv, attn, dattn, delta, seq, dim, tokens,
                  hidden.stride(0), hidden.stride(1), hidden.stride(2), mask_u8.stride(0), mask_u8.stride(1),
                  wdp.stride(0), dpooled.stride(0)], stream)
        grad_h = L.empty(*hidden.shape, dtype=hidden.dtype, device=dev) if need[0] else None
        dh_arg = grad_h if grad_h is not None else hidden
        L.launch(pool_bwd_kernel, grid,
                 [hidden, mask_u8, ids, wdp, dpooled, attn, dattn, delta, dh_arg, dwdp, seq, dim, tokens,
                  hidden.stride(0), hidden.stride(1), hidden.stride(2), mask_u8.stride(0), mask_u8.stride(1),
                  wdp.stride(0),
                  dh_arg.stride(0), dh_arg.stride(1), dh_arg.stride(2), dpooled.stride(0)],
                 dict(stream, STORE_DH=grad_h is not None))
        del attn, dattn

        no_extra = (0, 0, 0)
        grad_up = grad_down = grad_pool = None
        if need[6]:
            grad_up = L.empty(n_adapters, bottleneck, dim, dtype=wdt, device=dev)
            _seg_outer(p, grad_out, grad_up, order, seg, rat_num, rat_den, p, no_extra, p, no_extra, tokens,
                       True, False, version_b, prec)
        if need[2]:
            grad_down = L.empty(n_adapters, dim, bottleneck, dtype=wdt, device=dev)
            _seg_outer(pooled, dp, grad_down, order, seg, rat_num, rat_den,
                       dwdp, (dwdp.stride(0), dwdp.stride(1), dwdp.stride(2)),
                       w_pool, (w_pool.stride(0), w_pool.stride(2), w_pool.stride(1)),
                       tokens, False, True, version_b, prec)
        if need[3]:
            grad_pool = L.empty(n_adapters, bottleneck, tokens, dtype=wdt, device=dev)
            _adapter_mm(w_down, (w_down.stride(0), w_down.stride(2), w_down.stride(1)),
                        dwdp, (dwdp.stride(0), dwdp.stride(1), dwdp.stride(2)),
                        grad_pool, used, bottleneck, dim, tokens, tokens, prec)
        grad_num = dnum.to(rat_num.dtype) if need[4] else None
        grad_den = dden.to(rat_den.dtype) if need[5] else None
        return grad_h, None, grad_down, grad_pool, grad_num, grad_den, grad_up, None, None, None, grad_anchor, None


def triton_prompt_generator(
    hidden: Tensor,
    mask: Tensor,
    w_down: Tensor,
    w_pool: Tensor,
    rat_num: Tensor,
    rat_den: Tensor,
    w_up: Tensor,
    adapter_ids: Tensor | None = None,
    rational_version: str = "B",
    num_splits: int | None = None,
    anchor: Tensor | None = None,
    anchor_scale: Tensor | None = None,
) -> Tensor:
    """Fused generator on validated inputs (use ``iapt_fast.functional.prompt_generator``).

    Args:
        hidden [B, N, d] f32/f16/bf16; mask [B, N] bool; w_down [A, d, m]; w_pool [A, m, T]
        (T <= 16); rat_num [A, p+1]; rat_den [A, q]; w_up [A, m, d] (one float dtype);
        adapter_ids [B] int64 or None (A == 1); rational_version "A" | "B";
        num_splits: force the number of N-splits of the forward (None: heuristic).
        anchor [A, T, d] or None; anchor_scale [A] or None (a constant: no gradient).
    Returns:
        [B, T, d] = anchor[a] + anchor_scale[a]·R(p)·W_up[a] in hidden.dtype; differentiable
        w.r.t. hidden, every weight and the anchor.
    """
    if hidden.shape[0] == 0:
        # Keeps the graph connected so an empty batch still back-propagates zeros.
        keep = hidden.sum() * 0 + w_up.sum() * 0 + (anchor.sum() * 0 if anchor is not None else 0)
        return keep.to(hidden.dtype).expand(0, w_pool.shape[2], hidden.shape[2])
    if anchor_scale is not None:
        anchor_scale = anchor_scale.detach()
    return PromptGeneratorFunction.apply(hidden, mask, w_down, w_pool, rat_num, rat_den, w_up, adapter_ids,
                                         rational_version, num_splits, anchor, anchor_scale)

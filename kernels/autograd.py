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

Inference (no gradient needed) takes the one-launch forward instead where launch.fused_forward_pays
says so (design.md §4): generator_fwd_fused_kernel, with W_dp passed in by the caller (cached per
weights version) — launches 2–5 above in one.

Saved between passes: W_dp [A, d, 16], Ph [B, T, d], p [B, T, m] and two [B, T] statistics,
all float32: O(B·T·(d+m)), never O(B·N·T). Weights may have another dtype than hidden: every
kernel loads and converts in registers, so there is no host-side cast (no copy of the weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from iapt_fast.generator.weights import GeneratorWeights

from . import launch as policy
from .generator_bwd import pool_bwd_kernel, pool_bwd_scores_kernel
from .generator_fwd import combine_kernel, pool_fwd_kernel
from .generator_fwd_fused import generator_fwd_fused_kernel
from .lines import (MODE_GEMM, MODE_OUT, adapter_mm_kernel, lines_mm_kernel, rat_bwd_kernel, seg_outer_kernel,
                    seg_sum_kernel)

__all__ = ["triton_prompt_generator", "PromptGeneratorFunction", "ForwardState", "generator_forward", "generator_backward",
           "recompute_backward",
           "generator_weight_products", "fused_generator_forward"]


@dataclass(frozen=True)
class RowLayout:
    """The rows of a batch sorted by adapter, as the line kernels walk them.

    Attributes:
        order: [B] row indices in adapter order; sorted_ids: [B] their adapter ids.
        batch, tokens: B and T.
    """

    order: Tensor
    sorted_ids: Tensor
    batch: int
    tokens: int


@dataclass(frozen=True)
class RationalCoeffs:
    """The rational activation's coefficients: num [A, p+1], den [A, q], version B or A."""

    num: Tensor
    den: Tensor
    version_b: bool


@dataclass(frozen=True)
class StridedTensor:
    """A tensor the kernel reads with explicit strides (for a transposed or padded view)."""

    tensor: Tensor
    strides: tuple[int, ...]


def _lines_mm(mode: int, x: Tensor, w: StridedTensor, *, out_shape: tuple[int, int, int], out_dtype: torch.dtype,
              rows: RowLayout, coeffs: RationalCoeffs, k: int, prec: str, anchor: Tensor | None = None,
              scale: Tensor | None = None) -> Tensor:
    """out [B, T, nout] = f(x [B, T, k]) · W[a(row)]; ``w.strides`` are W's (adapter, k, nout) strides.

    f is the identity (MODE_GEMM) or the rational R (MODE_OUT, whose store can add the anchor
    and scale). Splits K across programs (float32 atomics into a zeroed buffer) when the line
    blocks alone are too few to fill the GPU: p = Ph·W_down has K = d = 4096 but only
    cdiv(B·T, 64)·cdiv(m, 64) output tiles (10 at B = 32, m = 320)."""
    nout = out_shape[2]
    dev = x.device
    lines = policy.lines_per_row(rows.tokens)
    row_blocks = policy.triton.cdiv(rows.batch, policy.LINES_BLOCK // lines)
    col_blocks = policy.triton.cdiv(nout, policy.LINES_BLOCK_OUT)
    k_splits, per_split = policy.choose_k_splits(row_blocks * col_blocks, k, dev)
    atomic = k_splits > 1 and mode == MODE_GEMM and anchor is None and scale is None
    if not atomic:
        k_splits, per_split = 1, max(k, 1)
    if atomic:
        out = torch.zeros(*out_shape, dtype=torch.float32, device=dev)
    else:
        out = policy.empty(*out_shape, dtype=out_dtype, device=dev)
    a_arg = anchor if anchor is not None else x  # never read without ANCHOR / SCALE
    s_arg = scale if scale is not None else x
    a_strides = (anchor.stride(0), anchor.stride(1), anchor.stride(2)) if anchor is not None else (0, 0, 0)
    num, den = coeffs.num, coeffs.den
    policy.launch(lines_mm_kernel, (row_blocks, col_blocks, k_splits),
                  dict(x_ptr=x, w_ptr=w.tensor, out_ptr=out, order_ptr=rows.order, sorted_ids_ptr=rows.sorted_ids,
                       num_ptr=num, den_ptr=den, anchor_ptr=a_arg, scale_ptr=s_arg, B=rows.batch, T=rows.tokens, K=k,
                       NOUT=nout, K_PER_SPLIT=per_split, **_named(("s_xb", "s_xt", "s_xk"), x.stride()),
                       **_named(("s_wa", "s_wk", "s_wn"), w.strides), **_named(("s_ob", "s_ot", "s_on"), out.stride()),
                       s_na=num.stride(0), s_da=den.stride(0), **_named(("s_aa", "s_at", "s_an"), a_strides),
                       s_sa=scale.stride(0) if scale is not None else 0),
                  dict(MODE=mode, ATOMIC=atomic, LINES_PER_ROW=lines, BLOCK_L=policy.LINES_BLOCK, BLOCK_K=policy.LINES_BLOCK_K,
                       BLOCK_NO=policy.LINES_BLOCK_OUT, P1=num.shape[1], Q=den.shape[1], VERSION_B=coeffs.version_b,
                       PREC=prec, ANCHOR=anchor is not None, SCALE=scale is not None))
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _adapter_mm(x: StridedTensor, y: StridedTensor, out: Tensor, *, used: Tensor, ni: int, k: int, nj: int,
                nj_store: int, prec: str) -> None:
    """out[a, i, j] = Σ_k x[a, i, k] y[a, k, j] for the adapters marked in ``used``; strides
    are (adapter, row, col); ``nj_store`` of the nj columns are stored."""
    grid = (out.shape[0], policy.triton.cdiv(ni, policy.LINES_BLOCK))
    policy.launch(adapter_mm_kernel, grid,
                  dict(x_ptr=x.tensor, y_ptr=y.tensor, out_ptr=out, used_ptr=used, NI=ni, K=k, NJ=nj, NJ_STORE=nj_store,
                       **_named(("s_xa", "s_xi", "s_xk"), x.strides), **_named(("s_ya", "s_yk", "s_yj"), y.strides),
                       **_named(("s_oa", "s_oi", "s_oj"), out.stride())),
                  dict(BLOCK_I=policy.LINES_BLOCK, BLOCK_K=policy.LINES_BLOCK_K, BLOCK_J=policy.TP_DOT, PREC=prec))


def _seg_outer(x: Tensor, y: Tensor, out: Tensor, *, rows: RowLayout, segments: Tensor, coeffs: RationalCoeffs,
               apply_r: bool, prec: str, dwdp: StridedTensor | None = None, w_pool: StridedTensor | None = None) -> None:
    """out[a] = Σ over adapter a's rows of f(x)ᵀ·y (a weight gradient), f = R when ``apply_r``.

    With ``dwdp`` and ``w_pool`` the kernel also adds dW_dp[a]·W_pool[a]ᵀ (the part of dW_down
    that flows through W_dp = W_down·W_pool)."""
    extra = dwdp is not None
    first = dwdp if extra else StridedTensor(x, (0, 0, 0))
    second = w_pool if extra else StridedTensor(x, (0, 0, 0))
    num, den = coeffs.num, coeffs.den
    grid = (out.shape[0], policy.triton.cdiv(out.shape[1], policy.LINES_BLOCK_OUT),
            policy.triton.cdiv(out.shape[2], policy.LINES_BLOCK_OUT))
    policy.launch(seg_outer_kernel, grid,
                  dict(x_ptr=x, y_ptr=y, out_ptr=out, order_ptr=rows.order, seg_ptr=segments, num_ptr=num, den_ptr=den,
                       prod_a_ptr=first.tensor, prod_b_ptr=second.tensor, T=rows.tokens, K1=out.shape[1], K2=out.shape[2],
                       **_named(("s_xb", "s_xt", "s_xk"), x.stride()), **_named(("s_yb", "s_yt", "s_yk"), y.stride()),
                       **_named(("s_oa", "s_oi", "s_oj"), out.stride()), s_na=num.stride(0), s_da=den.stride(0),
                       **_named(("s_pa_a", "s_pa_i", "s_pa_c"), first.strides),
                       **_named(("s_pb_a", "s_pb_c", "s_pb_j"), second.strides)),
                  dict(APPLY_R=apply_r, ADD_PRODUCT=extra, LINES_PER_ROW=policy.lines_per_row(rows.tokens), TP=policy.TP_DOT,
                       BLOCK_L=policy.LINES_BLOCK, BLOCK_I=policy.LINES_BLOCK_OUT, BLOCK_J=policy.LINES_BLOCK_OUT,
                       P1=num.shape[1], Q=den.shape[1], VERSION_B=coeffs.version_b, PREC=prec))


def _sizes(hidden: Tensor, w_down: Tensor, w_pool: Tensor) -> tuple[int, int, int, int, int, int]:
    """(B, N, d, A, m, T) of a generator call."""
    batch, seq, dim = hidden.shape
    n_adapters, _, bottleneck = w_down.shape
    return batch, seq, dim, n_adapters, bottleneck, w_pool.shape[2]


def _split_scratch(batch: int, splits: int, tokens: int, dim: int, dev: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The pooling's per-split partials: part [B, S, T, d] and the softmax statistics (max, sum)
    [B, S, 16], float32, which the combine (or the fused kernel's last split) merges."""
    f32 = dict(dtype=torch.float32, device=dev)
    return (policy.empty(batch, splits, tokens, dim, **f32), policy.empty(batch, splits, policy.TP_DOT, **f32),
            policy.empty(batch, splits, policy.TP_DOT, **f32))


def _named(names: tuple[str, ...], values) -> dict[str, int]:
    """Strides (or any per-axis values) as keyword arguments of a launch, one name per axis."""
    values = tuple(values)
    if len(values) != len(names):
        raise ValueError(f"{len(values)} values for the launch arguments {names}")
    return dict(zip(names, values))


def _strided(t: Tensor, transpose: bool = False) -> StridedTensor:
    """A 3-D [A, i, j] tensor as the kernels read it; ``transpose``: as [A, j, i] (a view, no copy)."""
    strides = (t.stride(0), t.stride(2), t.stride(1)) if transpose else (t.stride(0), t.stride(1), t.stride(2))
    return StridedTensor(t, strides)


# The forward's inputs, in order: ctx.needs_input_grad is read by these names.
_FORWARD_INPUTS = ("hidden", "mask", "w_down", "w_pool", "rat_num", "rat_den", "w_up", "adapter_ids", "version",
                   "num_splits", "anchor", "anchor_scale")
# The tensors the multi-launch forward keeps for its backward, in ForwardState's field order.
_SAVED = ("hidden", "mask_u8", "ids", "sorted_ids", "order", "used", "wdp", "pooled", "p", "row_m", "row_linv",
          "w_down", "w_pool", "rat_num", "rat_den", "w_up", "anchor_scale")


@dataclass(frozen=True)
class ForwardState:
    """What the multi-launch forward keeps for its backward: the inputs it reads again, the rows
    sorted by adapter, W_dp, Ph, p and the two [B, T] softmax statistics (module docstring), and
    the choices it made (precision, ids, rational version, anchor)."""

    hidden: Tensor
    mask_u8: Tensor
    ids: Tensor
    sorted_ids: Tensor
    order: Tensor
    used: Tensor
    wdp: Tensor
    pooled: Tensor
    p: Tensor
    row_m: Tensor
    row_linv: Tensor
    w_down: Tensor
    w_pool: Tensor
    rat_num: Tensor
    rat_den: Tensor
    w_up: Tensor
    anchor_scale: Tensor | None
    has_ids: bool
    version_b: bool
    cfg: dict
    anchor_dtype: torch.dtype | None  # None: no anchor

    def tensors(self) -> tuple[Tensor | None, ...]:
        """The saved tensors, for ``ctx.save_for_backward``."""
        return tuple(getattr(self, name) for name in _SAVED)

    def choices(self) -> tuple:
        return self.has_ids, self.version_b, self.cfg, self.anchor_dtype

    @classmethod
    def restore(cls, tensors: tuple, choices: tuple) -> "ForwardState":
        """The state from ``ctx.saved_tensors`` and what :meth:`choices` returned."""
        has_ids, version_b, cfg, anchor_dtype = choices
        return cls(*tensors, has_ids=has_ids, version_b=version_b, cfg=cfg, anchor_dtype=anchor_dtype)


def generator_forward(hidden: Tensor, mask: Tensor, w_down: Tensor, w_pool: Tensor, rat_num: Tensor, rat_den: Tensor,
                      w_up: Tensor, adapter_ids: Tensor | None, version: str, num_splits: int | None,
                      anchor: Tensor | None, anchor_scale: Tensor | None) -> tuple[Tensor, ForwardState]:
    """The multi-launch forward (launches 1–5 of the module docstring) on validated inputs; no
    autograd. Returns P [B, T, d] in hidden.dtype and what :func:`generator_backward` needs."""
    batch, seq, dim, n_adapters, bottleneck, tokens = _sizes(hidden, w_down, w_pool)
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    cfg = policy.precision(hidden.dtype)
    version_b = version == "B"
    has_ids = adapter_ids is not None and n_adapters > 1
    if has_ids:
        ids = adapter_ids.contiguous()
        sorted_ids, order = torch.sort(ids, stable=True)
        # index_put, not bincount: bincount syncs with the host on CUDA.
        used = torch.zeros(n_adapters, dtype=torch.int32, device=dev)
        used[ids] = 1
    else:
        ids = torch.zeros(max(batch, 1), dtype=torch.long, device=dev)
        sorted_ids = torch.zeros(batch, dtype=torch.long, device=dev)
        order = torch.arange(batch, dtype=torch.long, device=dev)
        used = torch.ones(n_adapters, dtype=torch.int32, device=dev)
    mask_u8 = mask.to(torch.uint8)
    rat_num = rat_num.contiguous()
    rat_den = rat_den.contiguous()

    wdp = policy.empty(n_adapters, dim, policy.TP_DOT, **f32)
    _adapter_mm(_strided(w_down), _strided(w_pool), wdp, used=used, ni=dim, k=bottleneck, nj=tokens,
                nj_store=policy.TP_DOT, prec=cfg["prec"])

    splits, per_split = policy.choose_splits(batch, seq, dev, num_splits)
    part, stat_m, stat_l = _split_scratch(batch, splits, tokens, dim, dev)
    bd = policy.block_d(dim)
    policy.launch(pool_fwd_kernel, (batch, splits),
             dict(h_ptr=hidden, mask_ptr=mask_u8, ids_ptr=ids, wdp_ptr=wdp, part_ptr=part, stat_m_ptr=stat_m,
                  stat_l_ptr=stat_l, N=seq, D=dim, T=tokens, TILES_PER_SPLIT=per_split,
                  **_named(("s_hb", "s_hn", "s_hd"), hidden.stride()), **_named(("s_mb", "s_mn"), mask_u8.stride()),
                  s_wa=wdp.stride(0), s_pb=part.stride(0), s_ps=part.stride(1), s_sb=stat_m.stride(0)),
             dict(HAS_IDS=has_ids, BLOCK_N=policy.STREAM_BLOCK_N, BLOCK_D=bd, TP=policy.TP_DOT,
                  SPLIT=cfg["fwd_split"], PREC=cfg["prec"]))
    pooled = policy.empty(batch, tokens, dim, **f32)
    row_m = policy.empty(batch, tokens, **f32)
    row_linv = policy.empty(batch, tokens, **f32)
    if splits == 0:  # N == 0: every row is empty and pools to zero
        pooled.zero_(), row_m.zero_(), row_linv.zero_()
    else:
        policy.launch(combine_kernel, (batch, policy.triton.cdiv(dim, bd)),
                 dict(part_ptr=part, stat_m_ptr=stat_m, stat_l_ptr=stat_l, ph_ptr=pooled, m_out_ptr=row_m,
                      linv_out_ptr=row_linv, S=splits, D=dim, T=tokens, s_pb=part.stride(0), s_ps=part.stride(1),
                      s_sb=stat_m.stride(0), s_phb=pooled.stride(0)),
                 dict(BLOCK_D=bd, TP=policy.TP_DOT))
    del part, stat_m, stat_l

    rows = RowLayout(order, sorted_ids, batch, tokens)
    coeffs = RationalCoeffs(rat_num, rat_den, version_b)
    p = _lines_mm(MODE_GEMM, pooled, _strided(w_down), out_shape=(batch, tokens, bottleneck),
                  out_dtype=torch.float32, rows=rows, coeffs=coeffs, k=dim, prec=cfg["prec"])
    out = _lines_mm(MODE_OUT, p, _strided(w_up), out_shape=(batch, tokens, dim), out_dtype=hidden.dtype,
                    rows=rows, coeffs=coeffs, k=bottleneck, prec=cfg["prec"], anchor=anchor, scale=anchor_scale)

    state = ForwardState(hidden, mask_u8, ids, sorted_ids, order, used, wdp, pooled, p, row_m, row_linv, w_down,
                         w_pool, rat_num, rat_den, w_up, anchor_scale, has_ids=has_ids, version_b=version_b, cfg=cfg,
                         anchor_dtype=anchor.dtype if anchor is not None else None)
    return out, state


def generator_backward(state: ForwardState, grad_out: Tensor, wants: dict[str, bool]) -> tuple[Tensor | None, ...]:
    """The backward launches (module docstring) from a forward's state.

    Args:
        grad_out: [B, T, d] dL/dP.
        wants: forward input name (``_FORWARD_INPUTS``) → whether its gradient is needed.
    Returns:
        One gradient (or None) per forward input, in ``_FORWARD_INPUTS`` order.
    """
    (hidden, mask_u8, ids, sorted_ids, order, used, wdp, pooled, p, row_m, row_linv,
     w_down, w_pool, rat_num, rat_den, w_up, anchor_scale) = state.tensors()
    has_ids, version_b, cfg, anchor_dtype = state.choices()
    has_anchor = anchor_dtype is not None
    batch, seq, dim, n_adapters, bottleneck, tokens = _sizes(hidden, w_down, w_pool)
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    prec = cfg["prec"]
    wdt = w_down.dtype
    # segments[a]:segments[a+1] = adapter a's rows in ``order``
    segments = torch.searchsorted(sorted_ids, torch.arange(n_adapters + 1, device=dev, dtype=sorted_ids.dtype))
    grad_anchor = None
    if has_anchor and wants["anchor"]:
        grad_anchor = policy.empty(n_adapters, tokens, dim, dtype=anchor_dtype, device=dev)
        bd = policy.block_d(dim)
        policy.launch(seg_sum_kernel, (n_adapters, policy.triton.cdiv(dim, bd)),
                 dict(x_ptr=grad_out, out_ptr=grad_anchor, order_ptr=order, seg_ptr=segments, T=tokens, D=dim,
                      **_named(("s_xb", "s_xt", "s_xd"), grad_out.stride()),
                      **_named(("s_oa", "s_ot", "s_od"), grad_anchor.stride())),
                 dict(LINES_PER_ROW=policy.lines_per_row(tokens), BLOCK_D=bd))
    if anchor_scale is not None:
        # The generator term is s·G: its weights see s·dP (a [B, T, d] float32 scratch).
        grad_out = grad_out.float() * anchor_scale.float()[ids[:batch]][:, None, None]

    dnum = torch.zeros(n_adapters, rat_num.shape[1], **f32)
    dden = torch.zeros(n_adapters, rat_den.shape[1], **f32)
    rows = RowLayout(order, sorted_ids, batch, tokens)
    coeffs = RationalCoeffs(rat_num, rat_den, version_b)
    dr = _lines_mm(MODE_GEMM, grad_out, _strided(w_up, transpose=True), out_shape=(batch, tokens, bottleneck),
                   out_dtype=torch.float32, rows=rows, coeffs=coeffs, k=dim, prec=prec)
    dp = policy.empty(batch, tokens, bottleneck, **f32)
    lines = policy.lines_per_row(tokens)
    policy.launch(rat_bwd_kernel, (policy.triton.cdiv(batch, policy.LINES_BLOCK // lines), policy.triton.cdiv(bottleneck, policy.LINES_BLOCK_OUT)),
             dict(dr_ptr=dr, p_ptr=p, dp_ptr=dp, order_ptr=order, sorted_ids_ptr=sorted_ids, num_ptr=rat_num,
                  den_ptr=rat_den, dnum_ptr=dnum, dden_ptr=dden, B=batch, T=tokens, M=bottleneck,
                  s_na=rat_num.stride(0), s_da=rat_den.stride(0)),
             dict(LINES_PER_ROW=lines, BLOCK_L=policy.LINES_BLOCK, BLOCK_M=policy.LINES_BLOCK_OUT, P1=rat_num.shape[1], Q=rat_den.shape[1],
                  VERSION_B=version_b))
    del dr
    dpooled = _lines_mm(MODE_GEMM, dp, _strided(w_down, transpose=True), out_shape=(batch, tokens, dim),
                        out_dtype=torch.float32, rows=rows, coeffs=coeffs, k=bottleneck, prec=prec)
    delta = torch.zeros(batch, tokens, **f32)

    dwdp = torch.zeros(n_adapters, dim, policy.TP_DOT, **f32)
    attn = policy.empty(batch, seq, tokens, **f32)
    dattn = policy.empty(batch, seq, tokens, **f32)
    grid = (batch, policy.triton.cdiv(seq, policy.STREAM_BLOCK_N))
    stream = dict(HAS_IDS=has_ids, BLOCK_N=policy.STREAM_BLOCK_N, BLOCK_D=policy.block_d(dim), TP=policy.TP_DOT,
                  SPLIT=cfg["bwd_split"], PREC=prec)
    policy.launch(pool_bwd_scores_kernel, grid,
             dict(h_ptr=hidden, mask_ptr=mask_u8, ids_ptr=ids, wdp_ptr=wdp, dph_ptr=dpooled, stat_m_ptr=row_m,
                  stat_linv_ptr=row_linv, attn_ptr=attn, da_ptr=dattn, delta_ptr=delta, N=seq, D=dim, T=tokens,
                  **_named(("s_hb", "s_hn", "s_hd"), hidden.stride()), **_named(("s_mb", "s_mn"), mask_u8.stride()),
                  s_wa=wdp.stride(0), s_dpb=dpooled.stride(0)), stream)
    grad_h = policy.empty(*hidden.shape, dtype=hidden.dtype, device=dev) if wants["hidden"] else None
    dh_arg = grad_h if grad_h is not None else hidden
    policy.launch(pool_bwd_kernel, grid,
             dict(h_ptr=hidden, mask_ptr=mask_u8, ids_ptr=ids, wdp_ptr=wdp, dph_ptr=dpooled, attn_ptr=attn,
                  da_ptr=dattn, delta_ptr=delta, dh_ptr=dh_arg, dwdp_ptr=dwdp, N=seq, D=dim, T=tokens,
                  **_named(("s_hb", "s_hn", "s_hd"), hidden.stride()), **_named(("s_mb", "s_mn"), mask_u8.stride()),
                  s_wa=wdp.stride(0), **_named(("s_gb", "s_gn", "s_gd"), dh_arg.stride()), s_dpb=dpooled.stride(0)),
             dict(stream, STORE_DH=grad_h is not None))
    del attn, dattn

    grad_up = grad_down = grad_pool = None
    if wants["w_up"]:
        grad_up = policy.empty(n_adapters, bottleneck, dim, dtype=wdt, device=dev)
        _seg_outer(p, grad_out, grad_up, rows=rows, segments=segments, coeffs=coeffs, apply_r=True, prec=prec)
    if wants["w_down"]:
        grad_down = policy.empty(n_adapters, dim, bottleneck, dtype=wdt, device=dev)
        _seg_outer(pooled, dp, grad_down, rows=rows, segments=segments, coeffs=coeffs, apply_r=False, prec=prec,
                   dwdp=_strided(dwdp), w_pool=_strided(w_pool, transpose=True))
    if wants["w_pool"]:
        grad_pool = policy.empty(n_adapters, bottleneck, tokens, dtype=wdt, device=dev)
        _adapter_mm(_strided(w_down, transpose=True), _strided(dwdp), grad_pool, used=used, ni=bottleneck, k=dim,
                    nj=tokens, nj_store=tokens, prec=prec)
    grad_num = dnum.to(rat_num.dtype) if wants["rat_num"] else None
    grad_den = dden.to(rat_den.dtype) if wants["rat_den"] else None
    return grad_h, None, grad_down, grad_pool, grad_num, grad_den, grad_up, None, None, None, grad_anchor, None


def recompute_backward(hidden: Tensor, mask: Tensor, weights: GeneratorWeights, adapter_ids: Tensor | None,
                       version: str, grad_out: Tensor, wants: dict[str, bool]) -> dict[str, Tensor | None]:
    """The gradients of a stateless caller (the registered operator, generator/functional.py): the
    multi-launch forward once more for its state, then :func:`generator_backward` — the same host
    functions :class:`PromptGeneratorFunction` runs.

    Returns:
        forward input name (``_FORWARD_INPUTS``) → its gradient, or None where none is wanted.
    """
    w_down, w_pool, rat_num, rat_den, w_up, anchor, anchor_scale = weights
    if hidden.shape[0] == 0:  # nothing to differentiate: zeros where a gradient is wanted
        inputs = dict(hidden=hidden, w_down=w_down, w_pool=w_pool, rat_num=rat_num, rat_den=rat_den, w_up=w_up,
                      anchor=anchor)
        return {name: torch.zeros_like(t) if t is not None and wants.get(name) else None for name, t in inputs.items()}
    with torch.no_grad():
        _, state = generator_forward(hidden, mask, w_down, w_pool, rat_num, rat_den, w_up, adapter_ids, version, None,
                                     anchor, anchor_scale.detach() if anchor_scale is not None else None)
        return dict(zip(_FORWARD_INPUTS, generator_backward(state, grad_out, wants)))


class PromptGeneratorFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`generator_forward` / :func:`generator_backward`; inputs are
    assumed validated by iapt_fast.generator.functional."""

    @staticmethod
    def forward(ctx, hidden, mask, w_down, w_pool, rat_num, rat_den, w_up, adapter_ids, version, num_splits,
                anchor, anchor_scale):
        out, state = generator_forward(hidden, mask, w_down, w_pool, rat_num, rat_den, w_up, adapter_ids, version,
                                       num_splits, anchor, anchor_scale)
        ctx.save_for_backward(*state.tensors())
        ctx.choices = state.choices()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        state = ForwardState.restore(ctx.saved_tensors, ctx.choices)
        return generator_backward(state, grad_out, dict(zip(_FORWARD_INPUTS, ctx.needs_input_grad)))


def generator_weight_products(w_down: Tensor, w_pool: Tensor) -> Tensor:
    """W_dp [A, d, 16] float32 = W_down[a]·W_pool[a] (columns >= T zero), the per-adapter product
    the forwards stream H against. One launch; inference callers compute it once per weights
    version and pass it to :func:`fused_generator_forward` (the serving packs of
    iapt_fast/generator/bank.py cache it).

    Args:
        w_down [A, d, m], w_pool [A, m, T] of one float dtype, T <= 16.
    """
    n_adapters, dim, bottleneck = w_down.shape
    wdp = policy.empty(n_adapters, dim, policy.TP_DOT, dtype=torch.float32, device=w_down.device)
    used = torch.ones(n_adapters, dtype=torch.int32, device=w_down.device)
    prec = "ieee" if policy.interpreting() or w_down.dtype == torch.float32 else "tf32x3"
    _adapter_mm(_strided(w_down), _strided(w_pool), wdp, used=used, ni=dim, k=bottleneck, nj=w_pool.shape[2],
                nj_store=policy.TP_DOT, prec=prec)
    return wdp


def _check_products(weight_products: Tensor, w_down: Tensor) -> None:
    want = (w_down.shape[0], w_down.shape[1], policy.TP_DOT)
    if (not isinstance(weight_products, Tensor) or tuple(weight_products.shape) != want
            or weight_products.dtype != torch.float32 or weight_products.device != w_down.device
            or not weight_products.is_contiguous()):
        got = (f"{tuple(weight_products.shape)} {weight_products.dtype} on {weight_products.device}"
               if isinstance(weight_products, Tensor) else type(weight_products).__name__)
        raise ValueError(f"weight_products must be a contiguous float32 tensor of shape {want} on "
                         f"{w_down.device} (generator_weight_products(w_down, w_pool)); got {got}")


@torch.no_grad()
def fused_generator_forward(hidden: Tensor, mask: Tensor, weights: GeneratorWeights, weight_products: Tensor,
                            adapter_ids: Tensor | None = None, rational_version: str = "B",
                            num_splits: int | None = None, arrivals: Tensor | None = None) -> Tensor:
    """The one-launch inference forward (kernels/generator_fwd_fused.py) on validated inputs.

    Args:
        hidden [B, N, d]; mask [B, N]; weights: the [A, ...] weights; weight_products: [A, d, 16]
        float32 from :func:`generator_weight_products` of these weights; adapter_ids [B] or None
        (A == 1); rational_version "A" | "B"; num_splits: force the number of N-splits;
        arrivals: int32 [>= B] zeros on hidden's device, the per-row arrival counters, which
        the kernel leaves zero again (a caller may keep one and skip the memset; one stream
        at a time); None: a fresh one.
    Returns:
        [B, T, d] in hidden.dtype, no gradient (inference only).
    """
    w_down, w_pool, rat_num, rat_den, w_up, anchor, anchor_scale = weights
    _check_products(weight_products, w_down)
    batch, seq, dim, n_adapters, bottleneck, tokens = _sizes(hidden, w_down, w_pool)
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    cfg = policy.precision(hidden.dtype)
    has_ids = adapter_ids is not None and n_adapters > 1
    ids = adapter_ids.contiguous() if has_ids else hidden  # never read without HAS_IDS
    # A bool mask is read as bytes in place: no cast kernel before the one launch.
    mask_u8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask.to(torch.uint8)
    rat_num, rat_den = rat_num.contiguous(), rat_den.contiguous()
    out = policy.empty(batch, tokens, dim, dtype=hidden.dtype, device=dev)
    if batch == 0:
        return out
    # N = 0 still needs one program per row: it writes anchor + scale·R(0)·W_up.
    splits, per_split = policy.choose_splits(batch, seq, dev, num_splits)
    splits = max(splits, 1)
    part, stat_m, stat_l = _split_scratch(batch, splits, tokens, dim, dev)
    rp = policy.empty(batch, policy.TP_DOT, bottleneck, **f32)
    if arrivals is None:
        count = torch.zeros(batch, dtype=torch.int32, device=dev)
    elif arrivals.dtype != torch.int32 or arrivals.device != dev or arrivals.dim() != 1 or arrivals.numel() < batch \
            or not arrivals.is_contiguous():
        raise ValueError(f"arrivals must be a contiguous int32 vector of >= {batch} zeros on {dev}; got "
                         f"{tuple(arrivals.shape)} {arrivals.dtype} on {arrivals.device}")
    else:
        count = arrivals
    a_arg = anchor if anchor is not None else w_down
    s_arg = anchor_scale.detach() if anchor_scale is not None else w_down
    a_strides = (anchor.stride(0), anchor.stride(1), anchor.stride(2)) if anchor is not None else (0, 0, 0)
    policy.launch(generator_fwd_fused_kernel, (batch, splits),
                  dict(h_ptr=hidden, mask_ptr=mask_u8, ids_ptr=ids, wdp_ptr=weight_products, part_ptr=part,
                       stat_m_ptr=stat_m, stat_l_ptr=stat_l, count_ptr=count, rp_ptr=rp, wd_ptr=w_down, wu_ptr=w_up,
                       num_ptr=rat_num, den_ptr=rat_den, anchor_ptr=a_arg, scale_ptr=s_arg, out_ptr=out,
                       N=seq, D=dim, T=tokens, M=bottleneck, S=splits, TILES_PER_SPLIT=per_split,
                       **_named(("s_hb", "s_hn", "s_hd"), hidden.stride()), **_named(("s_mb", "s_mn"), mask_u8.stride()),
                       s_wa=weight_products.stride(0), s_pb=part.stride(0), s_ps=part.stride(1), s_sb=stat_m.stride(0),
                       **_named(("s_wda", "s_wdd", "s_wdm"), w_down.stride()),
                       **_named(("s_wua", "s_wum", "s_wud"), w_up.stride()), s_na=rat_num.stride(0),
                       s_da=rat_den.stride(0), **_named(("s_aa", "s_at", "s_ad"), a_strides),
                       s_sa=anchor_scale.stride(0) if anchor_scale is not None else 0,
                       **_named(("s_ob", "s_ot", "s_od"), out.stride())),
                  dict(HAS_IDS=has_ids, ANCHOR=anchor is not None, SCALE=anchor_scale is not None,
                       BLOCK_N=policy.STREAM_BLOCK_N, BLOCK_D=policy.block_d(dim),
                       BLOCK_M=min(policy.FUSED_BLOCK_M, max(16, policy.triton.next_power_of_2(bottleneck))),
                       TP=policy.TP_DOT, SPLIT=cfg["fwd_split"], PREC=cfg["prec"], P1=rat_num.shape[1],
                       Q=rat_den.shape[1], VERSION_B=rational_version == "B"))
    return out


def _needs_graph(hidden: Tensor, weights: GeneratorWeights) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, *weights))


def triton_prompt_generator(hidden: Tensor, mask: Tensor, weights: GeneratorWeights, adapter_ids: Tensor | None = None,
                            rational_version: str = "B", num_splits: int | None = None,
                            weight_products: Tensor | None = None, fused: bool | None = None) -> Tensor:
    """Fused generator on validated inputs (use ``iapt_fast.generator.functional.prompt_generator``).

    Args:
        hidden [B, N, d] f32/f16/bf16; mask [B, N] bool; weights: the [A, ...] weights of one
        float dtype (T <= 16; anchor_scale is a constant: no gradient); adapter_ids [B] int64 or
        None (A == 1); rational_version "A" | "B"; num_splits: force the number of N-splits of
        the forward (None: heuristic); weight_products: [A, d, 16] float32 W_down·W_pool of these
        weights (generator_weight_products), cached by the caller: with it the one-launch
        forward is one launch, without it the product costs one more; fused: force (True) or
        forbid (False) the one-launch forward; None: when no gradient is needed and
        launch.fused_forward_pays says so (design.md §4).
    Returns:
        [B, T, d] = anchor[a] + anchor_scale[a]·R(p)·W_up[a] in hidden.dtype; differentiable
        w.r.t. hidden, every weight and the anchor (through the multi-launch forward).
    """
    w_down, w_pool, rat_num, rat_den, w_up, anchor, anchor_scale = weights
    if hidden.shape[0] == 0:
        # Keeps the graph connected so an empty batch still back-propagates zeros.
        keep = hidden.sum() * 0 + w_up.sum() * 0 + (anchor.sum() * 0 if anchor is not None else 0)
        return keep.to(hidden.dtype).expand(0, w_pool.shape[2], hidden.shape[2])
    if anchor_scale is not None:
        anchor_scale = anchor_scale.detach()
    if weight_products is not None:  # checked whichever forward runs: a wrong product is a caller bug
        _check_products(weight_products, w_down)
    inference = not _needs_graph(hidden, weights)
    if fused and not inference:
        raise ValueError("fused=True is the inference forward: call it under torch.no_grad() or with inputs "
                         "that do not require grad")
    if fused is None:
        fused = inference and policy.fused_forward_pays(hidden.shape[0], hidden.shape[2], w_down.shape[2],
                                                        hidden.dtype, w_down.element_size(), hidden.device)
    if fused:
        if weight_products is None:
            weight_products = generator_weight_products(w_down, w_pool)
        weights = GeneratorWeights(w_down, w_pool, rat_num, rat_den, w_up, anchor, anchor_scale)
        return fused_generator_forward(hidden, mask, weights, weight_products, adapter_ids, rational_version,
                                       num_splits)
    return PromptGeneratorFunction.apply(hidden, mask, w_down, w_pool, rat_num, rat_den, w_up, adapter_ids,
                                         rational_version, num_splits, anchor, anchor_scale)

"""The generator's fast PyTorch path (CPU tensors): design.md §1 math in the pooled-hidden order.

The literal reference (generator/reference.py) stays the oracle. This path computes the same
function in the order of the kernels (design.md §4): U = H·W_dp with W_dp = W_down·W_pool [d, T],
the masked softmax on the scores only, Ph = Aᵀ·H [T, d] and p = Ph·W_down. The forward reads H
twice and never copies it (float32 input). A batch that mixes adapters pools all its rows in one
pass (each row with its adapter's W_dp, [T, d] per row: the only per-row weight), then runs the
rest — p = Ph·W_down, R, ·W_up, the anchor — per adapter group on [rows, T, ·] tensors, so no
[d, m] weight is copied per row (unless most rows have an adapter of their own: then one product
per row is cheaper than one per group).
Differentiable w.r.t. hidden, every weight and the anchor: autograd, except the pooling over H,
whose backward is written out (_PooledHidden).

No argument validation here: ``iapt_fast.generator.functional`` validates.
"""
from __future__ import annotations

import torch
from torch import Tensor

from iapt_fast.generator.rational import rational
from iapt_fast.generator.weights import GeneratorWeights

__all__ = ["prompt_generator"]


def prompt_generator(hidden: Tensor, mask: Tensor, weights: GeneratorWeights, adapter_ids: Tensor | None = None,
                     version: str = "B") -> Tensor:
    """Soft tokens of every row of a (mixed-adapter) batch; the contract of ``reference.prompt_generator``.

    Args:
        hidden: [B, N, d] layer inputs.
        mask: [B, N] bool, True = instruction token to pool over.
        weights: the [A, ...] weights (anchor None: zero, anchor_scale None: one).
        adapter_ids: [B] int64 in [0, A); None means A == 1.
        version: rational version, "B" or "A".
    Returns:
        [B, T, d] = anchor[a] + anchor_scale[a] · R(p)·W_up[a] in ``hidden.dtype``, accumulated in
        float32 (float64 for float64 input). An all-masked row (or N = 0) pools to p = 0.
    """
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.to(cdt)
    keep = mask.to(torch.bool)
    single = _single_adapter(adapter_ids, hidden.shape[0])
    if single is not None:
        one = GeneratorWeights(*(None if w is None else w[single].to(cdt) for w in weights))
        w_dp_t = torch.matmul(one.w_down, one.w_pool).transpose(-1, -2)  # W_dpᵀ [T, d]
        pooled = torch.matmul(_PooledHidden.apply(h, w_dp_t, keep), one.w_down)  # p: [B, T, m]
        out = torch.matmul(rational(pooled, one.rat_num, one.rat_den, version), one.w_up)
        if one.anchor_scale is not None:
            out = out * one.anchor_scale
        return (out if one.anchor is None else out + one.anchor).to(hidden.dtype)
    # Only the U adapters present, each once (a pack may hold many more); ``local`` [B] indexes them.
    # Cast right after that selection: the rows' gradients of one adapter then add up in cdt.
    present, local = torch.unique(adapter_ids, return_inverse=True)
    w = GeneratorWeights(*(None if t is None else t.index_select(0, present).to(cdt) for t in weights))
    # Selected as [B, d, T] and then transposed: each row's W_dpᵀ has the layout of the one-adapter
    # path, so a row's result does not depend on whether its batch mixes adapters (bit for bit).
    w_dp_t = torch.matmul(w.w_down, w.w_pool).index_select(0, local).transpose(-1, -2)  # [B, T, d]
    pooled_hidden = _PooledHidden.apply(h, w_dp_t, keep)  # [B, T, d]
    groups = _groups(local, len(present))
    pooled = _per_group(pooled_hidden, w.w_down, local, groups)  # p: [B, T, m]
    num, den = w.rat_num.index_select(0, local), w.rat_den.index_select(0, local)
    out = _per_group(rational(pooled, num[:, None, None, :], den[:, None, None, :], version), w.w_up, local, groups)
    if w.anchor_scale is not None:
        out = out * w.anchor_scale.index_select(0, local)[:, None, None]
    if w.anchor is not None:
        out = out + w.anchor.index_select(0, local)
    return out.to(hidden.dtype)


def _groups(local: Tensor, present: int) -> tuple[list[tuple[int, Tensor]], Tensor] | None:
    """([(adapter, its rows)], the permutation that puts the groups' concatenated rows back in
    batch order) of a mixed batch's [B] indices into its ``present`` adapters (each used); None when
    most rows have an adapter of their own (one product per row is then cheaper than one per group)."""
    if 2 * present > local.shape[0]:
        return None
    groups = [(a, torch.nonzero(local == a).flatten()) for a in range(present)]
    return groups, torch.argsort(torch.cat([rows for _, rows in groups]))


def _per_group(x: Tensor, stacked: Tensor, local: Tensor,
               groups: tuple[list[tuple[int, Tensor]], Tensor] | None) -> Tensor:
    """[B, T, k] x times its row's adapter's [k, n] matrix of ``stacked`` [U, k, n] → [B, T, n]: one
    product per adapter present (a per-row gather copies [B, k, n]: only when groups is None)."""
    if groups is None:
        return torch.matmul(x, stacked.index_select(0, local))
    rows_of, inverse = groups
    parts = [torch.matmul(x.index_select(0, rows), stacked[a]) for a, rows in rows_of]
    return torch.cat(parts).index_select(0, inverse)


def _single_adapter(adapter_ids: Tensor | None, batch: int) -> int | None:
    """The one adapter every row uses, or None for a mixed batch (host tensors: no sync cost)."""
    if adapter_ids is None:
        return 0
    if batch == 0 or bool((adapter_ids == adapter_ids[0]).all()):
        return int(adapter_ids[0]) if batch else 0
    return None


class _PooledHidden(torch.autograd.Function):
    """Ph = softmax_N(W_dpᵀ·Hᵀ, masked)·H [B, T, d]: the two passes over H, and the backward's.

    Written out so that every product over H has a layout the BLAS runs fast (autograd's own
    backward forms dH from two rank-T products, one of them transposed, and adds them: several
    times the cost of the forward) and dH is one product of rank 2T into a fresh tensor.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # float32 accumulation under autocast too
    def forward(ctx, h: Tensor, w_dp_t: Tensor, keep: Tensor) -> Tensor:
        batch = h.shape[0]
        rows = w_dp_t.expand(batch, *w_dp_t.shape[-2:])  # [B, T, d]
        scores = torch.bmm(rows, h.transpose(1, 2))  # [B, T, N]
        if not bool(torch.isfinite(scores).all()):
            # A non-finite token (masked ones included: 0·NaN = NaN in A·H and in every
            # gradient) must not reach the products: zero the masked tokens, as the reference does.
            h = h.masked_fill(~keep[:, :, None], 0)
            scores = torch.bmm(rows, h.transpose(1, 2))
        attn = _masked_softmax(scores, keep)  # [B, T, N]
        ctx.save_for_backward(h, rows, attn)
        ctx.single = w_dp_t.dim() == 2
        return torch.bmm(attn, h)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        # float32 here too, also when backward runs inside an autocast region: dU = A·(dA − δ)
        # cancels, and bfloat16 products would leave little of it.
        with torch.autocast("cpu", enabled=False):
            return _PooledHidden._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: Tensor):
        h, rows, attn = ctx.saved_tensors
        grad = grad.to(h.dtype).contiguous()
        grad_attn = torch.bmm(grad, h.transpose(1, 2))  # [B, T, N]
        grad_scores = attn * (grad_attn - (attn * grad_attn).sum(dim=-1, keepdim=True))
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            # dH = Aᵀ·dPh + dUᵀ·W_dpᵀ, as one product of rank 2T.
            left = torch.cat([attn, grad_scores], dim=1).transpose(1, 2).contiguous()  # [B, N, 2T]
            grad_h = torch.bmm(left, torch.cat([grad, rows], dim=1))
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(grad_scores, h)  # [B, T, d]
            if ctx.single:
                grad_w = grad_w.sum(dim=0)
        return grad_h, grad_w, None


def _masked_softmax(scores: Tensor, keep: Tensor) -> Tensor:
    """Softmax over N of scores [B, T, N] restricted to keep [B, N]; an all-masked row gives 0."""
    masked = scores.masked_fill(~keep[:, None, :], float("-inf"))
    empty = ~keep.any(dim=1)  # [B]; True for every row when N = 0
    if not bool(empty.any()):
        return torch.softmax(masked, dim=-1)
    # exp(-inf - max) of an all -inf slice is NaN: softmax a zero row there, then drop it.
    masked = masked.masked_fill(empty[:, None, None], 0.0)
    return torch.softmax(masked, dim=-1) * (~empty).to(scores.dtype)[:, None, None]

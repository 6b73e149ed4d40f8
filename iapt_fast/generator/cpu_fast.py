"""The generator's fast PyTorch path (CPU tensors): design.md §1 math in the pooled-hidden order.

The literal reference (generator/reference.py) stays the oracle. This path computes the same
function in the order of the kernels (design.md §4): U = H·W_dp with W_dp = W_down·W_pool [d, T],
the masked softmax on the scores only, Ph = Aᵀ·H [T, d] and p = Ph·W_down. The forward reads H
twice and never copies it (float32 input); per-row weights are gathered only where a batch
mixes adapters, and the weight products then touch [B, T, ·] tensors, not [B, N, ·] ones.
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
    w_down, w_pool, rat_num, rat_den, w_up, anchor, anchor_scale = weights
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    batch = hidden.shape[0]
    h = hidden.to(cdt)
    keep = mask.to(torch.bool)
    single = _single_adapter(adapter_ids, batch)

    def pick(w: Tensor) -> Tensor:
        """Per-row weights in ``cdt``: one adapter's [...], or a [B, ...] gather for a mixed batch."""
        if single is not None:
            return w[single].to(cdt)
        if w.requires_grad and torch.is_grad_enabled():
            # Cast before the gather: the rows' gradients of one adapter then add up in cdt.
            w = w.to(cdt)
        return w.index_select(0, adapter_ids).to(cdt)

    wd = pick(w_down)  # [d, m] or [B, d, m]
    w_dp_t = torch.matmul(wd, pick(w_pool)).transpose(-1, -2)  # W_dpᵀ: [T, d] or [B, T, d]
    pooled_hidden = _PooledHidden.apply(h, w_dp_t, keep)  # [B, T, d]
    pooled = torch.matmul(pooled_hidden, wd)  # [B, T, m]
    num, den = pick(rat_num), pick(rat_den)
    if single is None:
        num, den = num[:, None, None, :], den[:, None, None, :]
    act = rational(pooled, num, den, version)
    out = torch.matmul(act, pick(w_up))  # [B, T, d]
    if anchor_scale is not None:
        scale = pick(anchor_scale)
        out = out * (scale if single is not None else scale[:, None, None])
    if anchor is not None:
        out = out + pick(anchor)
    return out.to(hidden.dtype)


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

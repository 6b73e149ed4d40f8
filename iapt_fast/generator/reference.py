"""Pure-PyTorch math of the IAPT prompt generator (design.md §1): the oracle and the CPU path.

Never imports the kernels. No argument validation here: ``iapt_fast.generator.functional`` validates.
"""
from __future__ import annotations

import torch
from torch import Tensor

from iapt_fast.generator.rational import rational
from iapt_fast.generator.weights import GeneratorWeights

__all__ = ["prompt_generator", "masked_softmax"]


def masked_softmax(scores: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax of ``scores`` over ``dim`` restricted to ``mask``; an all-masked slice gives 0.

    Args:
        scores: float tensor.
        mask: bool tensor broadcastable to ``scores`` (True = keep).
    """
    if scores.shape[dim] == 0:  # nothing to pool over (N = 0): every weight is 0, as for an all-masked slice
        return torch.zeros_like(scores)
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    masked = torch.where(mask, scores, neg_inf)
    row_max = masked.amax(dim=dim, keepdim=True)
    # An empty slice has max -inf; shifting by 0 instead keeps exp(-inf - 0) = 0, not NaN.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(masked - row_max)
    total = weights.sum(dim=dim, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def prompt_generator(hidden: Tensor, mask: Tensor, weights: GeneratorWeights, adapter_ids: Tensor | None = None,
                     version: str = "B") -> Tensor:
    """Soft tokens of every row of a (mixed-adapter) batch.

    Args:
        hidden: [B, N, d] layer inputs.
        mask: [B, N] bool, True = instruction token to pool over.
        weights: the [A, ...] weights (anchor None: zero, anchor_scale None: one).
        adapter_ids: [B] int64 in [0, A); None means A == 1.
        version: rational version, "B" or "A".
    Returns:
        [B, T, d] = anchor[a] + anchor_scale[a] · R(p)·W_up[a] in ``hidden.dtype``, accumulated
        in float32 (float64 for float64 input). A row with no instruction token (all-masked,
        or N = 0) pools to p = 0 and gets anchor[a] + anchor_scale[a] · R(0)·W_up[a].
    """
    w_down, w_pool, rat_num, rat_den, w_up, anchor, anchor_scale = weights
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    batch = hidden.shape[0]
    if adapter_ids is None:
        adapter_ids = torch.zeros(batch, dtype=torch.long, device=hidden.device)
    wd = w_down.to(cdt)[adapter_ids]  # [B, d, m]
    wp = w_pool.to(cdt)[adapter_ids]  # [B, m, T]
    num = rat_num.to(cdt)[adapter_ids]  # [B, p+1]
    den = rat_den.to(cdt)[adapter_ids]  # [B, q]
    wu = w_up.to(cdt)[adapter_ids]  # [B, m, d]

    keep = mask.to(torch.bool)[:, :, None]
    # Masked tokens must have no influence at all, even when they hold NaN or inf (0·NaN = NaN).
    x = torch.bmm(hidden.to(cdt).masked_fill(~keep, 0), wd)  # [B, N, m]
    scores = torch.bmm(x, wp)  # [B, N, T]
    attn = masked_softmax(scores, keep, dim=1)  # [B, N, T]
    pooled = torch.bmm(attn.transpose(1, 2), x)  # [B, T, m]
    act = rational(pooled, num[:, None, None, :], den[:, None, None, :], version)
    out = torch.bmm(act, wu)  # [B, T, d]
    if anchor_scale is not None:
        out = out * anchor_scale.to(cdt)[adapter_ids][:, None, None]
    if anchor is not None:
        out = out + anchor.to(cdt)[adapter_ids]
    return out.to(hidden.dtype)

"""``iapt_fast::prompt_generator``: the generator as a PyTorch custom operator.

``torch.compile`` cannot trace into the Triton autograd.Function or the reference's Python; as
a registered operator the generator is one opaque node with a fake (meta) implementation for
shapes and dtypes, and a registered backward, so a compiled forward + backward has no graph
break inside it. ``prompt_generator`` calls the operator while torch.compile traces, and the
eager paths otherwise (where the Triton backward reuses its forward's saved statistics).

Implementations: the PyTorch reference for CPU (and any device without another), the Triton
kernels for CUDA. The backward recomputes the forward of the same implementation and
differentiates it (the reference with autograd, the kernels with their own backward): one
extra forward per training step inside compiled graphs, the price of a stateless operator.
"""
from __future__ import annotations

import torch
from torch import Tensor

from iapt_fast.generator import reference
from iapt_fast.generator.weights import GeneratorWeights

__all__ = ["prompt_generator_op"]

# Inputs of the operator that can have a gradient (hidden, the five weights, the anchor).
_DIFFERENTIABLE = (0, 2, 3, 4, 5, 6, 8)


@torch.library.custom_op("iapt_fast::prompt_generator", mutates_args=())
def prompt_generator_op(hidden: Tensor, mask: Tensor, w_down: Tensor, w_pool: Tensor, rat_num: Tensor, rat_den: Tensor,
                        w_up: Tensor, adapter_ids: Tensor | None, anchor: Tensor | None, anchor_scale: Tensor | None,
                        version: str) -> Tensor:
    """[B, T, d] soft tokens; inputs validated by ``iapt_fast.generator.functional``."""
    weights = GeneratorWeights(w_down, w_pool, rat_num, rat_den, w_up, anchor, anchor_scale)
    return reference.prompt_generator(hidden, mask, weights, adapter_ids, version)


@prompt_generator_op.register_kernel("cuda")
def _cuda(hidden, mask, w_down, w_pool, rat_num, rat_den, w_up, adapter_ids, anchor, anchor_scale, version):
    from iapt_fast.kernels import triton_prompt_generator

    weights = GeneratorWeights(w_down, w_pool, rat_num, rat_den, w_up, anchor, anchor_scale)
    return triton_prompt_generator(hidden, mask, weights, adapter_ids, version)


@prompt_generator_op.register_fake
def _fake(hidden, mask, w_down, w_pool, rat_num, rat_den, w_up, adapter_ids, anchor, anchor_scale, version):
    return hidden.new_empty(hidden.shape[0], w_pool.shape[2], hidden.shape[2])


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:10])
    ctx.version = inputs[10]


def _backward(ctx, grad: Tensor):
    saved = list(ctx.saved_tensors)
    leaves = {}
    with torch.enable_grad():
        for i in _DIFFERENTIABLE:
            if saved[i] is not None and ctx.needs_input_grad[i]:
                saved[i] = leaves[i] = saved[i].detach().requires_grad_(True)
        hidden, mask, *core = saved[:7]
        weights = GeneratorWeights(*core, saved[8], saved[9])
        if hidden.device.type == "cuda":
            from iapt_fast.kernels import triton_prompt_generator
            out = triton_prompt_generator(hidden, mask, weights, saved[7], ctx.version)
        else:
            out = reference.prompt_generator(hidden, mask, weights, saved[7], ctx.version)
        grads = torch.autograd.grad(out, list(leaves.values()), grad, allow_unused=True) if leaves else ()
    result: list[Tensor | None] = [None] * 11
    for index, g in zip(leaves, grads):
        result[index] = g
    return tuple(result)


prompt_generator_op.register_autograd(_backward, setup_context=_setup_context)

"""``iapt_fast::prompt_generator``: the generator as a PyTorch custom operator.

``torch.compile`` cannot trace into the Triton autograd.Function or the reference's Python; as
a registered operator the generator is one opaque node with a fake (meta) implementation for
shapes and dtypes, and a registered backward, so a compiled forward + backward has no graph
break inside it. ``prompt_generator`` calls the operator while torch.compile traces, and the
eager paths otherwise (where the Triton backward reuses its forward's saved statistics).

Implementations: the eager paths' own — :func:`torch_prompt_generator` (generator/cpu_fast.py
on the CPU, the literal reference in float64 and on other devices) and the Triton kernels for
CUDA, which take the serving packs' cached W_down·W_pool (``weight_products``) as the eager call
does, so a compiled inference prefill is one launch as well. The backward recomputes the forward
and differentiates it (off CUDA the reference with autograd — AOT autograd traces the backward,
and the reference has no data-dependent branch; on CUDA the kernels' own backward, through the
host functions the eager autograd.Function runs: ``kernels/autograd.py`` ``recompute_backward``):
one extra forward per training step inside compiled graphs, the price of a stateless operator.
"""
from __future__ import annotations

import torch
from torch import Tensor

from iapt_fast.generator import cpu_fast, reference
from iapt_fast.generator.weights import GeneratorWeights

__all__ = ["prompt_generator_op", "torch_prompt_generator"]

# Inputs of the operator that can have a gradient (hidden, the five weights, the anchor).
_DIFFERENTIABLE = (0, 2, 3, 4, 5, 6, 8)


def torch_prompt_generator(hidden: Tensor, mask: Tensor, weights: GeneratorWeights, adapter_ids: Tensor | None,
                           version: str) -> Tensor:
    """The PyTorch path, eager or inside the operator: generator/cpu_fast.py for CPU tensors
    below float64; the literal reference for float64 (the tests' oracle) and other devices."""
    if hidden.device.type == "cpu" and hidden.dtype != torch.float64:
        return cpu_fast.prompt_generator(hidden, mask, weights, adapter_ids, version)
    return reference.prompt_generator(hidden, mask, weights, adapter_ids, version)


@torch.library.custom_op("iapt_fast::prompt_generator", mutates_args=())
def prompt_generator_op(hidden: Tensor, mask: Tensor, w_down: Tensor, w_pool: Tensor, rat_num: Tensor, rat_den: Tensor,
                        w_up: Tensor, adapter_ids: Tensor | None, anchor: Tensor | None, anchor_scale: Tensor | None,
                        version: str, weight_products: Tensor | None = None) -> Tensor:
    """[B, T, d] soft tokens; inputs validated by ``iapt_fast.generator.functional``.
    ``weight_products``: see ``functional.prompt_generator`` (only the kernels read it)."""
    weights = GeneratorWeights(w_down, w_pool, rat_num, rat_den, w_up, anchor, anchor_scale)
    return torch_prompt_generator(hidden, mask, weights, adapter_ids, version)


@prompt_generator_op.register_kernel("cuda")
def _cuda(hidden, mask, w_down, w_pool, rat_num, rat_den, w_up, adapter_ids, anchor, anchor_scale, version,
          weight_products=None):
    from iapt_fast.kernels import triton_prompt_generator

    weights = GeneratorWeights(w_down, w_pool, rat_num, rat_den, w_up, anchor, anchor_scale)
    return triton_prompt_generator(hidden, mask, weights, adapter_ids, version, weight_products=weight_products)


@prompt_generator_op.register_fake
def _fake(hidden, mask, w_down, w_pool, rat_num, rat_den, w_up, adapter_ids, anchor, anchor_scale, version,
          weight_products=None):
    return hidden.new_empty(hidden.shape[0], w_pool.shape[2], hidden.shape[2])


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:10])
    ctx.version = inputs[10]


def kernels_differentiate(device: torch.device) -> bool:
    """Whether the operator's backward runs the Triton kernels' own backward on ``device`` (CUDA);
    elsewhere AOT autograd traces it, so it is the reference's autograd."""
    return device.type == "cuda"


# The operator's inputs, named as the kernels' forward names them (kernels/autograd.py).
_OP_INPUT_NAMES = ("hidden", "mask", "w_down", "w_pool", "rat_num", "rat_den", "w_up", "adapter_ids", "anchor",
                   "anchor_scale", "version", "weight_products")


def _backward(ctx, grad: Tensor):
    saved = list(ctx.saved_tensors)
    hidden, mask, *core = saved[:7]
    result: list[Tensor | None] = [None] * 12
    if kernels_differentiate(hidden.device):
        # The same host functions as the eager autograd.Function: the forward's state, then its backward.
        from iapt_fast.kernels import recompute_backward

        wants = {_OP_INPUT_NAMES[i]: bool(ctx.needs_input_grad[i]) for i in _DIFFERENTIABLE}
        grads = recompute_backward(hidden, mask, GeneratorWeights(*core, saved[8], saved[9]), saved[7], ctx.version,
                                   grad, wants)
        for i in _DIFFERENTIABLE:
            result[i] = grads.get(_OP_INPUT_NAMES[i])
        return tuple(result)
    # Traced by AOT autograd in compiled graphs: the reference, whose code has no data-dependent branch.
    leaves = {}
    with torch.enable_grad():
        for i in _DIFFERENTIABLE:
            if saved[i] is not None and ctx.needs_input_grad[i]:
                saved[i] = leaves[i] = saved[i].detach().requires_grad_(True)
        hidden, mask, *core = saved[:7]
        weights = GeneratorWeights(*core, saved[8], saved[9])
        out = reference.prompt_generator(hidden, mask, weights, saved[7], ctx.version)
        grads = torch.autograd.grad(out, list(leaves.values()), grad, allow_unused=True) if leaves else ()
    for index, g in zip(leaves, grads):
        result[index] = g
    return tuple(result)


prompt_generator_op.register_autograd(_backward, setup_context=_setup_context)

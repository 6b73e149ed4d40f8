"""The generator as the custom operator ``iapt_fast::prompt_generator``: torch.library.opcheck
(schema, fake tensors, autograd registration, AOT dispatch) for a matrix of shapes, dtypes and
adapter layouts, and torch.compile of prompt_generator without a graph break, equal to eager."""
from __future__ import annotations

import pytest
import torch

from iapt_fast.generator import functional
from iapt_fast.generator.functional import prompt_generator_op

# On a GPU the operator's CUDA implementation (the Triton kernels) is checked; else the CPU one.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(batch, seq, dim, m, tokens, adapters, dtype, weight_dtype, anchored, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=weight_dtype, grad=True):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt).requires_grad_(grad)

    hidden = rnd(batch, seq, dim, dt=dtype)
    mask = torch.rand(batch, seq, generator=g) < 0.7
    mask[:, 0] = True
    mask = mask.to(device)
    weights = [rnd(adapters, dim, m, scale=dim**-0.5), rnd(adapters, m, tokens, scale=m**-0.5),
               rnd(adapters, 4, scale=0.3), rnd(adapters, 3, scale=0.3), rnd(adapters, m, dim, scale=m**-0.5)]
    ids = (torch.arange(batch) % adapters).to(device) if adapters > 1 else None
    anchor = rnd(adapters, tokens, dim) if anchored else None
    scale = (torch.rand(adapters, generator=g) + 0.5).to(device=device, dtype=weight_dtype) if anchored else None
    return hidden, mask, weights, ids, anchor, scale


CASES = [
    (2, 5, 8, 4, 4, 1, torch.float32, torch.float32, False),
    (3, 7, 12, 6, 3, 2, torch.float32, torch.float32, True),
    (4, 3, 8, 5, 16, 3, torch.bfloat16, torch.float32, True),
    (2, 6, 10, 4, 2, 2, torch.float64, torch.float64, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}N{c[1]}d{c[2]}m{c[3]}T{c[4]}A{c[5]}-{c[6]}-{c[8]}")
def test_opcheck(case):
    if DEVICE.type == "cuda" and case[6] == torch.float64:
        case = case[:6] + (torch.float32, torch.float32) + case[8:]  # the kernels take f32/f16/bf16
    hidden, mask, weights, ids, anchor, scale = _inputs(*case, device=DEVICE)
    result = torch.library.opcheck(prompt_generator_op, (hidden, mask, *weights, ids, anchor, scale, "B"))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_with_cached_weight_products():
    # The serving packs' W_down·W_pool travel through the operator too (a compiled inference
    # prefill on CUDA is then one launch); the result is the same as without them.
    hidden, mask, weights, ids, anchor, scale = _inputs(3, 7, 12, 6, 3, 2, torch.float32, torch.float32, True,
                                                        device=DEVICE)
    with torch.no_grad():
        products = torch.zeros(2, 12, 16, device=DEVICE)
        products[..., :3] = torch.bmm(weights[0].double(), weights[1].double()).float()
    args = (hidden, mask, *weights, ids, anchor, scale, "B")
    result = torch.library.opcheck(prompt_generator_op, args + (products,))
    assert all(v == "SUCCESS" for v in result.values()), result
    with torch.no_grad():
        torch.testing.assert_close(prompt_generator_op(*args, products), prompt_generator_op(*args))


@pytest.mark.parametrize("anchored", [False, True])
def test_compiled_generator_has_no_graph_break_and_matches_eager(anchored):
    hidden, mask, weights, ids, anchor, scale = _inputs(3, 6, 8, 4, 4, 2, torch.float32, torch.float32, anchored)

    def step(h, *ws):
        out = functional.prompt_generator(h, mask, *ws, adapter_ids=ids, backend="torch", check_ids=False,
                                          anchor=anchor, anchor_scale=scale)
        return (out * torch.linspace(-1, 1, out.shape[-1])).sum()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(hidden, *weights)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(step, backend=record, fullgraph=True)(hidden, *weights)
    assert "iapt_fast.prompt_generator.default" in seen, seen  # one opaque node, not traced Python
    leaves = [hidden, *weights] + ([anchor] if anchored else [])
    eager = step(hidden, *weights)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(step, fullgraph=True)(hidden, *weights)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,anchored", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)],
                         ids=["f32", "f32-anchored", "bf16-anchored"])
def test_operator_backward_on_the_kernels_is_the_autograd_functions(dtype, anchored, monkeypatch):
    """The operator's CUDA backward (the kernels' own, through recompute_backward) runs here under
    the Triton interpreter, on fresh random inputs: its gradients equal the eager
    autograd.Function's bit for bit (the same host functions and launches), and output and every
    gradient pass the tolerance rule against the float64 reference (tests/kernels_cases.check)."""
    from iapt_fast.kernels import PromptGeneratorFunction
    from kernels_cases import NAMES, check, make_problem

    monkeypatch.setattr(functional, "kernels_differentiate", lambda device: True)
    prob = make_problem(batch=3, seq=9, dim=16, bottleneck=8, adapters=2, dtype=dtype, anchored=anchored)

    def through_op(leaves):
        w = prob.weights_of(leaves)
        return prompt_generator_op(leaves[0], prob.mask, *w[:5], prob.ids, w.anchor, w.anchor_scale, prob.version)

    def through_function(leaves):
        w = prob.weights_of(leaves)
        return PromptGeneratorFunction.apply(leaves[0], prob.mask, *w[:5], prob.ids, prob.version, None, w.anchor,
                                             w.anchor_scale)

    check(prob, through_op)
    leaves = prob.inputs()
    grad = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(prob.seed)).to(dtype)
    got = torch.autograd.grad(through_op(leaves), leaves, grad)
    eager = torch.autograd.grad(through_function(leaves), leaves, grad)
    for name, a, b in zip(NAMES, got, eager):
        assert torch.equal(a, b), name

"""torch.compile of an IAPTModel: a training step (forward and its backward, CPU inductor) and
the decode step of generate() with a static cache.

The generator must compile as one custom operator (no graph break inside it); the compiled
results must equal eager ones by the tolerance rule (an eager float32 reference: bound = atol),
and compiled decode steps must give the eager tokens with no graph break at all (fullgraph).
These compile tiny models only: about a minute of CPU in all.
"""
from __future__ import annotations

import os

import pytest
import torch

import iapt_fast
from iapt_fast.compat import decode_compile_config
from iapt_fast.generator import functional, reference
from iapt_fast.generator.tolerance import assert_close_by_rule
from iapt_fast import IAPTConfig
from slow_reference import padded_batch, tiny_model
from test_model import CallCounter, wrap

pytestmark = pytest.mark.usefixtures("one_thread")

LIBRARY = os.path.dirname(iapt_fast.__file__)
GENERATOR_DIRS = (os.path.join(LIBRARY, "generator"), os.path.join(LIBRARY, "kernels"))
OP_NODE = "iapt_fast.prompt_generator.default"


def _training_batch(seed: int):
    ids, mask, inst = padded_batch(3, 9, "left", seed=seed)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, inst, labels


def generator_breaks(explanation) -> list[str]:
    """The graph breaks whose user stack passes through the generator's code."""
    found = []
    for reason in explanation.break_reasons:
        frames = [f"{f.filename}:{f.lineno}" for f in reason.user_stack
                  if os.path.realpath(f.filename).startswith(GENERATOR_DIRS)]
        if frames:
            found.append(f"{reason.reason} at {frames}")
    return found


def _op_in_graphs(explanation) -> bool:
    return any(OP_NODE in str(node.target) for graph in explanation.graphs for node in graph.graph.nodes)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compiled_training_step_matches_eager_without_graph_breaks_in_the_generator(family):
    model = tiny_model(family, "sdpa")
    wrapped = wrap(model, init_std_up=0.1)
    wrapped.add_adapter("other", IAPTConfig(bottleneck_dim=8, init_std_up=0.1), seed=3)
    wrapped.train()
    ids, mask, inst, labels = _training_batch(seed=29)
    names = ["default", "other", "default"]  # a mixed batch: one launch over two adapters
    for name in ("default", "other"):
        for p in wrapped.generators[name].parameters():
            p.requires_grad_(True)
    params = [p for p in wrapped.generators.parameters()]

    def step(ids, mask, inst, labels):
        return wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, labels=labels,
                       adapter_names=names).loss

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(ids, mask, inst, labels)
    assert generator_breaks(explanation) == []
    assert _op_in_graphs(explanation), "the generator did not run inside a compiled graph"
    eager = step(ids, mask, inst, labels)
    eager_grads = torch.autograd.grad(eager, params)
    torch._dynamo.reset()
    compiled = torch.compile(step)(ids, mask, inst, labels)
    compiled_grads = torch.autograd.grad(compiled, params)
    assert_close_by_rule(compiled, eager, eager, "loss")
    for (name, _), got, want in zip(wrapped.generators.named_parameters(), compiled_grads, eager_grads):
        assert want.abs().max() > 0, f"{name}: no gradient: the test is vacuous"
        assert_close_by_rule(got, want, want, name)


def test_the_graph_break_check_sees_a_break_inside_the_generator(monkeypatch):
    # The check above must be able to fail: a graph break in the generator's pooling.
    original = reference.prompt_generator

    def broken(*args, **kwargs):
        torch._dynamo.graph_break()
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, "prompt_generator", broken)
    monkeypatch.setattr(functional, "_compiling", lambda: False)  # not the operator: its Python is traced
    wrapped = wrap(tiny_model("llama", "sdpa"))
    ids, mask, inst, labels = _training_batch(seed=31)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(
        lambda *a: wrapped(input_ids=a[0], attention_mask=a[1], instruction_mask=a[2], labels=a[3]).loss)(
        ids, mask, inst, labels)
    assert generator_breaks(explanation), "a graph break inside the generator went unseen"
    assert not _op_in_graphs(explanation)


@pytest.mark.parametrize("family,device", [("llama", "cpu"), ("gpt2", "cpu"), ("llama", "cuda")])
def test_compiled_decode_step_with_a_static_cache_gives_the_eager_tokens(family, device, monkeypatch):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA: mode='reduce-overhead' captures the decode step in a CUDA graph")
    model = tiny_model(family, "sdpa", layers=3).to(device)
    wrapped = wrap(model)
    wrapped.backend = "auto"  # the Triton kernels at prefill on CUDA
    wrapped.add_adapter("part", IAPTConfig(bottleneck_dim=8, init_std_up=0.5, target_layers=[1]), seed=2)
    ids, mask, inst = (t.to(device) for t in padded_batch(3, 8, "left", seed=37))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    torch._dynamo.reset()
    for names in (["default", "__base__", "default"], ["part", "part", "__base__"]):
        eager = wrapped.generate(ids, attention_mask=mask, instruction_mask=inst, adapter_names=names, **kwargs)
        counter = CallCounter(monkeypatch)
        # fullgraph: any graph break in a decode step (the hooks included) fails the call.
        compiled = wrapped.generate(ids, attention_mask=mask, instruction_mask=inst, adapter_names=names,
                                    compile_config=decode_compile_config(device, fullgraph=True), **kwargs)
        assert hasattr(model, "_compiled_call"), "generate() did not compile the decode step"
        assert torch.equal(compiled, eager), names
        layers = len(wrapped.generators[names[0]].layer_indices)
        assert counter.calls == layers  # at prefill only: the compiled decode steps run no generator

"""pytest-benchmark microbenchmarks: the generator (reference and kernels) and the rational.

Run with ``pytest benchmarks --benchmark-only`` (add ``--benchmark-autosave`` and later
``--benchmark-compare`` to see regressions); the normal ``pytest`` run (testpaths = tests)
does not collect them. The Triton cases need CUDA: the interpreter is not a backend to time.
"""
from __future__ import annotations

import pytest
import torch

from suites.kernels import KernelCase, make_inputs
from iapt_fast.generator import rational
from iapt_fast.generator import reference
from iapt_fast.generator.weights import GeneratorWeights
from iapt_fast.generator.functional import prompt_generator

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = "bfloat16" if DEVICE == "cuda" else "float32"
CASES = {
    "small-A1": KernelCase(4, 128, 256, 20, 4, 1, DTYPE),
    "small-A8": KernelCase(8, 128, 256, 20, 4, 8, DTYPE),
    "mid-A1": KernelCase(8, 256, 1024, 80, 4, 1, DTYPE),
}
if DEVICE == "cuda":
    CASES["7b-16k-A32"] = KernelCase(32, 512, 4096, 320, 4, 32, DTYPE)
BACKENDS = ["torch", "triton"]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _skip_unless_runnable(backend: str) -> None:
    if backend == "triton" and DEVICE != "cuda":
        pytest.skip("Triton kernels are timed on CUDA only (the interpreter is a correctness tool)")


def _args(case: KernelCase, grad: bool):
    inp = make_inputs(case, DEVICE)
    weights = list(inp["weights"].values())
    leaves = [inp["hidden"]] + weights
    if grad:
        for t in leaves:
            t.requires_grad_(True)
    return (inp["hidden"], inp["mask"], *weights), inp["adapter_ids"], leaves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_generator_forward(benchmark, name, backend):
    _skip_unless_runnable(backend)
    case = CASES[name]
    args, ids, _ = _args(case, grad=False)
    benchmark.group = f"generator-fwd {name}"

    def run():
        with torch.no_grad():
            out = prompt_generator(*args, adapter_ids=ids, backend=backend)
        _sync()
        return out

    out = benchmark(run)
    assert out.shape == (case.batch, case.t, case.d) and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_generator_forward_backward(benchmark, name, backend):
    _skip_unless_runnable(backend)
    case = CASES[name]
    args, ids, leaves = _args(case, grad=True)
    grad_out = torch.randn(case.batch, case.t, case.d, device=DEVICE, dtype=args[0].dtype)
    benchmark.group = f"generator-fwdbwd {name}"

    def run():
        out = prompt_generator(*args, adapter_ids=ids, backend=backend)
        grads = torch.autograd.grad(out, leaves, grad_out)
        _sync()
        return grads

    grads = benchmark(run)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["small-A1", "mid-A1"])
def test_reference_eager_forward(benchmark, name):
    """The bare reference, without the functional API's validation: the eager baseline."""
    case = CASES[name]
    args, ids, _ = _args(case, grad=False)
    benchmark.group = f"generator-fwd {name}"

    def run():
        with torch.no_grad():
            out = reference.prompt_generator(args[0], args[1], GeneratorWeights(*args[2:]), ids)
        _sync()
        return out

    benchmark(run)


@pytest.mark.parametrize("version", ["A", "B"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwdbwd"])
def test_rational(benchmark, version, grad):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 320, generator=gen).to(DEVICE)
    num = (torch.randn(7, generator=gen) * 0.3).to(DEVICE)
    den = (torch.randn(5, generator=gen) * 0.3).to(DEVICE)
    benchmark.group = f"rational-{'fwdbwd' if grad else 'fwd'}"
    if grad:
        for t in (x, num, den):
            t.requires_grad_(True)

    def run():
        out = rational(x, num, den, version)
        if grad:
            out = torch.autograd.grad(out.sum(), (x, num, den))
        _sync()
        return out

    benchmark(run)

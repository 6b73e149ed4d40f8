"""The one-launch inference forward (kernels/generator_fwd_fused.py) vs the float64 reference.

design.md §4 rule on fresh random inputs, outputs poisoned before the launch; odd shapes (d not
a multiple of BLOCK_D, N = 37 over 32-token tiles, N = 1, N = 0, all-masked rows), A = 1..32
mixed, T = 1..16, every hidden dtype; exactly one launch per call; the arrival counters are left
zero; the serving packs' cached W_down·W_pool is never stale; every variant compiles for sm_90.
Shapes are tiny: the interpreter is slow.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from iapt_fast.config import IAPTConfig
from iapt_fast.generator import functional
from iapt_fast.generator.bank import GeneratorBank, ServingPacks
from iapt_fast.generator.limits import MAX_SOFT_TOKENS
from iapt_fast.generator.weights import GeneratorWeights
from iapt_fast.kernels import poison_buffers, record_launches, triton_prompt_generator
from iapt_fast.kernels.autograd import fused_generator_forward, generator_weight_products
from kernels_cases import check, make_problem

pytestmark = pytest.mark.skipif(not functional.triton_available(), reason="triton not importable")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FUSED = "generator_fwd_fused_kernel"


@pytest.fixture(autouse=True)
def _poison():
    with poison_buffers():
        yield


def one_launch(prob, num_splits=None):
    """The dispatching entry point under no_grad with a precomputed product: the inference path."""
    def run(leaves):
        with torch.no_grad():
            weights = prob.weights_of(leaves)
            products = generator_weight_products(weights.w_down, weights.w_pool)
            with record_launches() as specs:
                triton_prompt_generator(leaves[0], prob.mask, weights, prob.ids, prob.version,
                                        num_splits=num_splits, weight_products=products)
            assert [s.name for s in specs] == [FUSED]
            return triton_prompt_generator(leaves[0], prob.mask, weights, prob.ids, prob.version,
                                           num_splits=num_splits, weight_products=products)
    return run


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_adapters_odd_shapes_split_n(dtype):
    # d = 40 (BLOCK_D 64), m = 24 (BLOCK_M 32), N = 37 split in two: the partials are merged by
    # the last program of each row; row 1 is all masked.
    prob = make_problem(batch=4, seq=37, dim=40, bottleneck=24, tokens=5, adapters=3, dtype=dtype, anchored=True)
    check(prob, one_launch(prob, num_splits=2), grad=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_token_and_single_adapter(dtype):
    prob = make_problem(batch=2, seq=1, dim=24, bottleneck=20, tokens=1, adapters=1, dtype=dtype,
                        mask_kind="full")
    check(prob, one_launch(prob), grad=False)


@pytest.mark.parametrize("adapters,tokens,version", [(2, 16, "A"), (32, 3, "B")])
def test_many_adapters_and_soft_token_counts(adapters, tokens, version):
    # A = 32 over 6 rows: most adapters unused, the rows' adapters gathered by id.
    prob = make_problem(batch=6, seq=9, dim=72, bottleneck=40, tokens=tokens, adapters=adapters, version=version,
                        dtype=torch.float16, mask_kind="random")
    check(prob, one_launch(prob, num_splits=3), grad=False)


@pytest.mark.parametrize("hidden_dtype,weight_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=str)
def test_weight_dtype_differs(hidden_dtype, weight_dtype):
    # Weights are converted in registers (no host cast); the output is in the hidden dtype.
    prob = make_problem(batch=3, seq=20, dim=24, bottleneck=16, tokens=3, dtype=hidden_dtype, weight_dtype=weight_dtype,
                        anchored=True)
    check(prob, one_launch(prob, num_splits=2), grad=False)


def test_strided_hidden_and_weights():
    # Every operand is read through its strides: a non-contiguous H and W_up give the same result.
    prob = make_problem(batch=3, seq=7, dim=24, bottleneck=16, tokens=3, adapters=2, dtype=torch.float16,
                        anchored=True)
    leaves = prob.inputs()
    with torch.no_grad():
        weights = prob.weights_of(leaves)
        products = generator_weight_products(weights.w_down, weights.w_pool)
        plain = fused_generator_forward(leaves[0], prob.mask, weights, products, prob.ids, prob.version)
        h = leaves[0].detach().transpose(0, 1).contiguous().transpose(0, 1)
        w_up = weights.w_up.detach().transpose(1, 2).contiguous().transpose(1, 2)
        assert not h.is_contiguous() and not w_up.is_contiguous()
        strided = fused_generator_forward(h, prob.mask, weights._replace(w_up=w_up), products, prob.ids, prob.version)
    assert torch.equal(plain, strided)
    check(prob, lambda _: strided, grad=False)


@pytest.mark.parametrize("anchored", [False, True])
def test_empty_sequence_rows(anchored):
    # N = 0: one program per row with no tile; it must still write anchor + s·R(0)·W_up, as
    # the reference does for an all-masked row.
    prob = make_problem(batch=3, seq=1, dim=24, bottleneck=16, tokens=4, dtype=torch.float32, anchored=anchored)
    leaves = prob.inputs()
    with torch.no_grad():
        weights = prob.weights_of(leaves)
        products = generator_weight_products(weights.w_down, weights.w_pool)
        out = fused_generator_forward(leaves[0][:, :0], prob.mask[:, :0], weights, products, prob.ids, prob.version)
        ref = functional.prompt_generator(leaves[0].double(), torch.zeros_like(prob.mask),
                                          *[w.double() for w in leaves[1:6]], adapter_ids=prob.ids, backend="torch",
                                          rational_version=prob.version,
                                          **{k: (v.double() if v is not None else None)
                                             for k, v in prob.anchor_kwargs(leaves).items()})
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_arrival_counters_are_left_zero_for_the_next_launch():
    prob = make_problem(batch=3, seq=70, dim=24, bottleneck=16, tokens=2, dtype=torch.float32)
    arrivals = torch.zeros(8, dtype=torch.int32)
    leaves = prob.inputs()
    with torch.no_grad():
        weights = prob.weights_of(leaves)
        products = generator_weight_products(weights.w_down, weights.w_pool)
        first = fused_generator_forward(leaves[0], prob.mask, weights, products, prob.ids, prob.version,
                                        num_splits=3, arrivals=arrivals)
        assert (arrivals == 0).all()
        second = fused_generator_forward(leaves[0], prob.mask, weights, products, prob.ids, prob.version,
                                         num_splits=3, arrivals=arrivals)
    assert torch.equal(first, second)
    check(prob, lambda _: second, grad=False)
    with pytest.raises(ValueError, match="arrivals"):
        fused_generator_forward(leaves[0], prob.mask, weights, products, prob.ids, prob.version,
                                arrivals=torch.zeros(2, dtype=torch.int32))


def test_dispatch_inference_one_launch_training_multi_launch():
    prob = make_problem(batch=2, seq=5, dim=24, bottleneck=16, tokens=2, dtype=torch.float32)
    leaves = prob.inputs()
    weights = prob.weights_of(leaves)
    products = generator_weight_products(weights.w_down.detach(), weights.w_pool.detach())
    with record_launches() as train:  # a gradient is needed: the multi-launch forward
        triton_prompt_generator(leaves[0], prob.mask, weights, prob.ids, prob.version, weight_products=products)
    assert FUSED not in [s.name for s in train] and len(train) == 5
    with pytest.raises(ValueError, match="fused=True"):
        triton_prompt_generator(leaves[0], prob.mask, weights, prob.ids, prob.version, fused=True)
    with torch.no_grad(), record_launches() as infer:
        triton_prompt_generator(leaves[0], prob.mask, weights, prob.ids, prob.version, weight_products=products)
    assert [s.name for s in infer] == [FUSED]
    with torch.no_grad(), record_launches() as bad:
        with pytest.raises(ValueError, match="weight_products"):
            triton_prompt_generator(leaves[0], prob.mask, weights, prob.ids, prob.version, fused=True,
                                    weight_products=products[:, :, :4])
    assert bad == []


def test_dispatch_follows_the_cost_model():
    # d = 4096, m = 320, bf16, one row: the per-row epilogue (~70 µs in one program) costs more
    # than the launches it saves, so inference keeps the multi-launch forward (design.md §4).
    def launches(batch):
        hidden = torch.empty(batch, 8, 4096, dtype=torch.bfloat16)
        mask = torch.ones(batch, 8, dtype=torch.bool)
        w = [torch.empty(1, 4096, 320, dtype=torch.bfloat16), torch.empty(1, 320, 4, dtype=torch.bfloat16),
             torch.empty(1, 7, dtype=torch.bfloat16), torch.empty(1, 5, dtype=torch.bfloat16),
             torch.empty(1, 320, 4096, dtype=torch.bfloat16)]
        with torch.no_grad(), record_launches() as specs:
            triton_prompt_generator(hidden, mask, GeneratorWeights(*w), None, "B",
                                    weight_products=torch.empty(1, 4096, 16))
        return [s.name for s in specs]
    assert FUSED not in launches(1)
    assert launches(132) == [FUSED]  # one full wave of rows: the epilogue is spread as well


def _bank(dtype=torch.float32):
    cfg = IAPTConfig(num_soft_tokens=3, bottleneck_dim=8, generator_form="paper", target_layers=[0, 1])
    bank = GeneratorBank(hidden_size=16, num_layers=2)
    for i, name in enumerate(("a", "b")):
        bank.add_adapter(name, cfg, seed=i)
    return bank.to(dtype)


def _expected(bank, names, layer):
    rows = [torch.zeros(16, 16, dtype=torch.float64) for _ in names]
    for row, name in zip(rows, names):
        gen = bank[name][layer]
        row[:, :3] = gen.w_down.double() @ gen.w_pool.double()
    return torch.stack(rows).float()


def test_serving_pack_products_follow_every_weight_update():
    bank = _bank()
    packs = ServingPacks(bank)
    pack, _ = packs.locate(bank.snapshot())["a"]
    first = pack.weight_products(1)
    torch.testing.assert_close(first, _expected(bank, pack.names, 1), rtol=1e-6, atol=1e-6)
    assert pack.weight_products(1) is first  # computed once per weights version
    with torch.no_grad():  # in place through one adapter's parameter (what an optimiser does)
        bank["b"][1].w_down.mul_(3.0)
    again = pack.weight_products(1)
    assert again is not first
    torch.testing.assert_close(again, _expected(bank, pack.names, 1), rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # in place through the stack itself
        pack.weights[1]["w_pool"][0].add_(1.0)
    torch.testing.assert_close(pack.weight_products(1), _expected(bank, pack.names, 1), rtol=1e-6, atol=1e-6)
    bank.to(torch.float64)  # a dtype move: the pack is rebuilt, and its products with it
    moved, _ = packs.locate(bank.snapshot())["a"]
    assert moved is not pack
    with torch.no_grad():
        bank["a"][1].w_pool.mul_(-2.0)
    torch.testing.assert_close(moved.weight_products(1), _expected(bank, moved.names, 1), rtol=1e-6, atol=1e-6)


def test_inference_products_only_for_the_triton_forward():
    # IAPTModel's hooks and the vLLM host ask the pack the same question (one definition).
    bank = _bank()
    pack, _ = ServingPacks(bank).locate(bank.snapshot())["a"]
    cpu = torch.device("cpu")
    assert pack.inference_products(1, "torch", cpu) is None
    assert pack.inference_products(1, "triton", cpu) is pack.weight_products(1)
    wide = GeneratorBank(hidden_size=16, num_layers=2)
    wide.add_adapter("w", IAPTConfig.paper(num_soft_tokens=MAX_SOFT_TOKENS + 1, bottleneck_dim=8), seed=0)
    wide_pack, _ = ServingPacks(wide).locate(wide.snapshot())["w"]
    assert wide_pack.inference_products(0, "triton", cpu) is None  # beyond the kernels' T: the torch path


def test_every_fused_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "iapt_fast.kernels.compile_check", "--arch", "90", "--level", "ci",
                           "--only", FUSED, "--json"], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode not in (0, 1) and torch.cuda.is_available():
        pytest.skip(f"offline compile unavailable with a GPU present:\n{proc.stderr[-800:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results and {r["kernel"] for r in results} == {FUSED}
    for r in results:
        assert r["has_cubin"] and r["shared"] <= 227 * 1024, r
        assert r["acq_rel_atomic"], f"{r['constexprs']}: the arrival counter lost its acq_rel semantics"
    real = [r for r in results if r["constexprs"]["BLOCK_D"] == "128"]
    assert {r["signature"]["h_ptr"] for r in real} == {"*bf16", "*fp16", "*fp32"}
    assert {r["constexprs"]["BLOCK_M"] for r in results} == {"64", "32"}
    assert {r["constexprs"]["ANCHOR"] for r in real} == {"True", "False"}
    assert all(r["tensor_cores"] for r in real if r["signature"]["h_ptr"] != "*fp32")


def test_iapt_model_serving_is_one_launch_per_target_layer(monkeypatch):
    # A prefill of a mixed batch of 3 adapters through IAPTModel: every target layer's generator
    # is one launch (the packs' cached W_down·W_pool), and the logits are the reference's.
    from iapt_fast import get_iapt_model
    from iapt_fast.kernels import launch as policy
    from slow_reference import padded_batch, tiny_model

    wrapped = get_iapt_model(tiny_model("llama", "sdpa", layers=2), IAPTConfig(bottleneck_dim=8, init_std_up=0.5),
                             seed=1, backend="torch")
    for i, name in enumerate(("b", "c")):
        wrapped.add_adapter(name, seed=10 + i)
    names = ["default", "b", "c"]
    ids, mask, inst = padded_batch(3, 6, "left", seed=5)
    launched = []
    real_launch = policy.launch

    def counting(kernel, *args, **kwargs):
        launched.append(kernel.__name__)
        return real_launch(kernel, *args, **kwargs)

    monkeypatch.setattr(policy, "launch", counting)
    with torch.no_grad():
        ref = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, adapter_names=names).logits
        wrapped.backend = "triton"
        out = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, adapter_names=names).logits
    assert launched == [FUSED] * 2, launched
    assert (out - ref)[mask.bool()].abs().max().item() <= 1e-4

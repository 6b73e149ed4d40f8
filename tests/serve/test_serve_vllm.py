"""IAPT adapters served by vLLM (offline ``IAPTLLM``): greedy tokens equal ``IAPTModel.generate``.

Needs vLLM (the serve environment, see README "Serving"). One engine serves every test of this
module: float32, prefix caching on (salted), 32-token KV blocks and a small KV cache, so that the
larger batches are preempted and recomputed.
"""
from __future__ import annotations

import os
import random

import pytest

from serve_fixtures import make_adapters, make_backbone, reference_prompt_logprobs, reference_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_BLOCKS = 20  # × 32 tokens: room for a 256-token request, not for every request of a batch at once


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from iapt_fast.serve.offline import IAPTLLM

    root = tmp_path_factory.mktemp("serve")
    base = os.path.join(root, "base")
    model = make_backbone(base)
    paths = make_adapters(model, os.path.join(root, "adapters"))
    llm = IAPTLLM(base, paths, dtype="float32", max_model_len=256, seed=0, enable_prefix_caching=True,
                  block_size=32, num_gpu_blocks_override=NUM_BLOCKS, max_num_seqs=16, disable_log_stats=False)
    yield model, paths, llm
    llm.shutdown()


def greedy(n: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n)


def random_prompts(count: int, seed: int, low: int = 3, high: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 420) for _ in range(rng.randrange(low, high))] for _ in range(count)]


def preemptions(llm) -> int:
    return sum(m.value for m in llm.llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_mixed_batch_of_adapters_and_base_rows_equals_iapt_generate(served):
    model, paths, llm = served
    names = ["a", None, "b", "c", "wide", "a", None, "c", "wide", "b"]
    prompts = random_prompts(len(names), seed=1)
    outs = llm.generate(prompts, greedy(12), adapter_names=names)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == reference_tokens(model, paths, prompts, names, 12)
    assert [o.prompt_token_ids for o in outs] == prompts
    # The adapters matter: every adapter row's tokens differ from the bare backbone's.
    base = reference_tokens(model, paths, prompts, [None] * len(names), 12)
    assert all(g != b for g, b, n in zip(got, base, names) if n is not None)


def test_prompt_logprobs_are_the_prompts_own_and_equal_iapt_forward(served):
    from vllm import SamplingParams

    model, paths, llm = served
    names = ["wide", None, "c"]
    prompts = random_prompts(len(names), seed=5, low=8, high=30)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0),
                        adapter_names=names)
    for out, prompt, name in zip(outs, prompts, names):
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None  # no placeholder rows, nothing before token 0
        values = [got[i][tok].logprob for i, tok in enumerate(prompt) if i > 0]
        want = reference_prompt_logprobs(model, paths, prompt, name)
        assert max(abs(a - b) for a, b in zip(values, want)) < 1e-3, name


def test_requests_arriving_while_others_decode(served):
    model, paths, llm = served
    engine = llm.llm.llm_engine
    names = ["wide", None, "a", "c", "b", None, "a"]
    prompts = random_prompts(len(names), seed=2)
    waves = [(0, 3), (3, 5), (5, 7)]
    done: dict[str, list[int]] = {}
    for wave, (lo, hi) in enumerate(waves):
        for i in range(lo, hi):
            engine.add_request(f"arrive-{i}", llm.engine_prompt(prompts[i], names[i]), greedy(10))
        for _ in range(3 if wave < len(waves) - 1 else 10_000):  # later waves join running decodes
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = list(out.outputs[0].token_ids)
            if not engine.has_unfinished_requests():
                break
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    got = [done[f"arrive-{i}"] for i in range(len(names))]
    assert got == reference_tokens(model, paths, prompts, names, 10)


def test_prefix_cache_is_salted_per_adapter_and_prompt(served):
    """Prompts on one adapter that share their first 70 tokens must not share cache blocks (every
    key and value depends on the whole prompt); the same prompt again does hit, exactly."""
    model, paths, llm = served
    shared = random_prompts(1, seed=3, low=69, high=70)[0]
    tails = random_prompts(3, seed=4, low=8, high=9)  # one length: the placeholder header is the same
    prompts = [shared + t[1:] for t in tails]
    first = llm.generate(prompts[:1] * 2 + [shared + tails[0][1:]], greedy(6), adapter_names=["a", None, "b"])
    second = llm.generate(prompts + [prompts[0], prompts[0]], greedy(6), adapter_names=["a", "a", "a", "a", None])
    names = ["a", "a", "a", "a", None]
    assert [list(o.outputs[0].token_ids) for o in second] == reference_tokens(model, paths, prompts + [prompts[0]] * 2,
                                                                              names, 6)
    assert [list(o.outputs[0].token_ids) for o in first] == reference_tokens(model, paths, [prompts[0]] * 3,
                                                                             ["a", None, "b"], 6)
    cached = [o.num_cached_tokens for o in second]
    assert cached[1] == 0 and cached[2] == 0  # same adapter, shared 70 tokens, other prompt: no hit
    assert cached[0] >= 64 and cached[3] >= 64  # the same (adapter, prompt): hit
    assert cached[4] >= 64  # the bare backbone's blocks are shared as usual


def test_preempted_requests_are_recomputed_exactly(served):
    model, paths, llm = served
    names = ["a", "b", "c", "wide", None, "a", "c", "wide"]
    prompts = random_prompts(len(names), seed=5, low=24, high=40)
    before = preemptions(llm)
    outs = llm.generate(prompts, greedy(70), adapter_names=names)
    assert preemptions(llm) > before, "the KV cache was large enough: no request was preempted"
    assert [list(o.outputs[0].token_ids) for o in outs] == reference_tokens(model, paths, prompts, names, 70)


def test_unknown_adapter_and_bad_options_are_refused(served):
    _, paths, llm = served
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        llm.generate([[1, 5, 6]], greedy(2), adapter_names=["nope"])
    with pytest.raises(ValueError, match="one name per prompt"):
        llm.generate([[1, 5, 6]], greedy(2), adapter_names=["a", "b"])
    from iapt_fast.serve.offline import IAPTLLM

    with pytest.raises(ValueError, match="enable_chunked_prefill"):
        IAPTLLM(os.path.dirname(os.path.dirname(paths["a"])) + "/base", paths, enable_chunked_prefill=True)

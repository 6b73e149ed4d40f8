"""Every family vLLM and IAPT share, served: greedy tokens equal ``IAPTModel.generate``
(llama is covered at length by test_serve_vllm.py). Needs vLLM (the serve environment)."""
from __future__ import annotations

import os
import random

import pytest

from serve_fixtures import make_adapters, make_backbone, reference_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_family_mixed_batch_equals_iapt_generate(family, tmp_path):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams

    from iapt_fast.serve.offline import IAPTLLM

    base = os.path.join(tmp_path, "base")
    model = make_backbone(base, family=family)
    paths = make_adapters(model, os.path.join(tmp_path, "adapters"))
    names = ["a", None, "c", "wide", "b", None]
    rng = random.Random(len(family))
    prompts = [[1] + [rng.randrange(3, 420) for _ in range(rng.randrange(3, 50))] for _ in names]
    llm = IAPTLLM(base, paths, dtype="float32", max_model_len=256, seed=0, enable_prefix_caching=True)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, min_tokens=10),
                            adapter_names=names)
    finally:
        llm.shutdown()
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == reference_tokens(model, paths, prompts, names, 10)
    base_tokens = reference_tokens(model, paths, prompts, [None] * len(names), 10)
    assert all(g != b for g, b, n in zip(got, base_tokens, names) if n is not None)

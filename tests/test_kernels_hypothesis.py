"""Property test: the fused kernels match the reference on small random problems.

Hypothesis draws shapes, degrees, rational version, dtype, adapter layout, masks and split
counts; the inputs themselves are fresh random tensors (seeded by hypothesis, so a failure
shrinks and replays). Under the interpreter each example costs ~0.5 s: 12 examples.
"""
import os

import pytest
import torch

from iapt_fast.generator import functional
from iapt_fast.kernels import poison_buffers, triton_prompt_generator
from kernels_cases import check, make_problem

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(not functional.triton_available(), reason="triton not importable")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@settings(max_examples=int(os.environ.get("IAPT_HYPOTHESIS_EXAMPLES", "12")), deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    batch=st.integers(1, 4),
    seq=st.integers(1, 70),
    dim=st.integers(1, 80),
    bottleneck=st.integers(1, 40),
    tokens=st.integers(1, 16),
    adapters=st.integers(1, 3),
    p=st.integers(0, 6),
    q=st.integers(1, 5),
    version=st.sampled_from(["A", "B"]),
    dtype=st.sampled_from(sorted(DTYPES)),
    mask_kind=st.sampled_from(["mixed", "random", "full"]),
    num_splits=st.one_of(st.none(), st.integers(1, 3)),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(batch, seq, dim, bottleneck, tokens, adapters, p, q, version, dtype, mask_kind,
                           num_splits, seed):
    prob = make_problem(batch=batch, seq=seq, dim=dim, bottleneck=bottleneck, tokens=tokens, adapters=adapters,
                        degrees=(p, q), version=version, dtype=DTYPES[dtype], mask_kind=mask_kind, seed=seed)
    with poison_buffers():
        check(prob, lambda leaves: triton_prompt_generator(leaves[0], prob.mask, prob.weights_of(leaves), prob.ids,
                                                           prob.version, num_splits=num_splits))

"""The reference generator against an independent naive loop, and its invariants."""
import pytest
import torch

from iapt_fast import prompt_generator
from iapt_fast.generator import rational
from iapt_fast.generator.reference import masked_softmax
from rational_oracle import exact_batch, fresh_seed, random_coefficients


def _weights(A, d, m, T, p=6, q=5, dtype=torch.float64):
    return dict(
        w_down=torch.randn(A, d, m, dtype=dtype) / d**0.5,
        w_pool=torch.randn(A, m, T, dtype=dtype),
        rat_num=torch.randn(A, p + 1, dtype=dtype) * 0.3,
        rat_den=torch.randn(A, q, dtype=dtype) * 0.3,
        w_up=torch.randn(A, m, d, dtype=dtype),
    )


def _naive(hidden, mask, w, ids, version="B", act=rational):
    """Per row, per soft token, per instruction token: design.md §1 spelled out in float64
    (``act(pooled [m], num, den, version)`` applies the rational)."""
    B, N, d = hidden.shape
    T = w["w_pool"].shape[2]
    out = torch.zeros(B, T, d, dtype=torch.float64)
    for b in range(B):
        a = int(ids[b])
        wd, wp, wu = w["w_down"][a].double(), w["w_pool"][a].double(), w["w_up"][a].double()
        tokens = [n for n in range(N) if bool(mask[b, n])]
        for t in range(T):
            if not tokens:
                pooled = torch.zeros(wd.shape[1], dtype=torch.float64)
            else:
                xs = [hidden[b, n].double() @ wd for n in tokens]
                scores = torch.stack([x @ wp[:, t] for x in xs])
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                pooled = sum(wgt * x for wgt, x in zip(weights, xs))
            r = act(pooled, w["rat_num"][a].double(), w["rat_den"][a].double(), version)
            out[b, t] = r @ wu
    return out


@pytest.mark.parametrize("version", ["A", "B"])
def test_matches_naive_loop_mixed_batch(version):
    B, N, d, m, T, A = 5, 7, 12, 6, 3, 3
    hidden = torch.randn(B, N, d, dtype=torch.float64)
    mask = torch.rand(B, N) > 0.4
    mask[0] = True
    mask[1, :] = False  # empty row
    mask[2, :] = False
    mask[2, 3] = True  # single token
    ids = torch.tensor([2, 0, 2, 1, 0])
    w = _weights(A, d, m, T)
    out = prompt_generator(hidden, mask, **w, adapter_ids=ids, rational_version=version)
    torch.testing.assert_close(out, _naive(hidden, mask, w, ids, version), rtol=1e-10, atol=1e-10)


def test_float32_accumulation_for_half_inputs():
    B, N, d, m, T = 2, 9, 16, 8, 4
    w = _weights(1, d, m, T, dtype=torch.float32)
    hidden = torch.randn(B, N, d)
    mask = torch.ones(B, N, dtype=torch.bool)
    ref = prompt_generator(hidden.double(), mask, **{k: v.double() for k, v in w.items()})
    for dtype in (torch.float16, torch.bfloat16):
        out = prompt_generator(hidden.to(dtype), mask, **w)
        assert out.dtype == dtype
        # Only the input and output roundings: error of the order of the dtype's epsilon.
        rel = (out.double() - ref).abs().max() / ref.abs().max()
        assert rel < 8 * torch.finfo(dtype).eps


def test_masked_tokens_and_padding_have_no_influence():
    B, N, d, m, T = 3, 10, 16, 8, 4
    w = _weights(1, d, m, T, dtype=torch.float32)
    hidden = torch.randn(B, N, d)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, 3:] = True  # left padding
    mask[1, :6] = True  # right padding
    mask[2, 2:7] = True  # instruction in the middle (response after, padding before)
    out = prompt_generator(hidden, mask, **w)
    poked = hidden.clone()
    poked[~mask] = torch.randn(int((~mask).sum()), d) * 1e3
    torch.testing.assert_close(prompt_generator(poked, mask, **w), out, rtol=0, atol=0)
    # ...and the unmasked tokens do matter.
    poked2 = hidden.clone()
    poked2[mask] += torch.randn(int(mask.sum()), d)
    assert (prompt_generator(poked2, mask, **w) - out).abs().max() > 1e-3


def test_empty_mask_pools_to_zero_without_nan():
    d, m, T = 16, 8, 4
    w = {k: v.float().requires_grad_(True) for k, v in _weights(1, d, m, T).items()}
    hidden = (torch.randn(2, 5, d) * 1e3).requires_grad_(True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 1] = True
    out = prompt_generator(hidden, mask, **w)
    # p = 0 → P = R(0)·W_up = a_0 · column sums of W_up.
    expected = (w["rat_num"][0, 0] * w["w_up"][0].sum(0)).expand(T, d)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    for name, t in [("hidden", hidden), *w.items()]:
        assert torch.isfinite(t.grad).all(), name
    assert hidden.grad[0].abs().max() == 0


def test_large_magnitude_is_finite():
    d, m, T = 32, 8, 4
    w = _weights(1, d, m, T, dtype=torch.float32)
    hidden = torch.randn(2, 6, d) * 1e3
    mask = torch.ones(2, 6, dtype=torch.bool)
    out = prompt_generator(hidden, mask, **w)
    ref = prompt_generator(hidden.double(), mask, **{k: v.double() for k, v in w.items()})
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


def test_mixed_batch_equals_separate_calls():
    B, N, d, m, T, A = 6, 5, 16, 8, 4, 4
    w = _weights(A, d, m, T, dtype=torch.float32)
    hidden = torch.randn(B, N, d)
    mask = torch.rand(B, N) > 0.3
    mask[:, 0] = True
    ids = torch.tensor([3, 1, 3, 0, 1, 3])
    out = prompt_generator(hidden, mask, **w, adapter_ids=ids)
    for a in range(A):
        rows = (ids == a).nonzero().flatten()
        if rows.numel() == 0:
            continue
        single = {k: v[a : a + 1] for k, v in w.items()}
        torch.testing.assert_close(out[rows], prompt_generator(hidden[rows], mask[rows], **single))


def test_gradcheck_all_inputs():
    B, N, d, m, T, A = 3, 4, 5, 3, 2, 2
    w = {k: v.requires_grad_(True) for k, v in _weights(A, d, m, T, p=3, q=2).items()}
    hidden = torch.randn(B, N, d, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    ids = torch.tensor([1, 0, 1])

    def fn(h, wd, wp, rn, rd, wu):
        return prompt_generator(h, mask, wd, wp, rn, rd, wu, adapter_ids=ids)

    args = (hidden, w["w_down"], w["w_pool"], w["rat_num"], w["rat_den"], w["w_up"])
    assert torch.autograd.gradcheck(fn, args)


def test_masked_softmax_rows():
    scores = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 1, 0, 1, 0]], dtype=torch.bool)
    out = masked_softmax(scores, mask, dim=1)
    torch.testing.assert_close(out[0], torch.softmax(scores[0], 0))
    assert (out[1] == 0).all()
    torch.testing.assert_close(out[2, [1, 3]], torch.softmax(scores[2, [1, 3]], 0))
    assert (out[2, [0, 2, 4]] == 0).all()


@pytest.mark.parametrize("version,coefficients", [("B", "gelu"), ("B", "random"), ("A", "random")])
def test_huge_hidden_gives_finite_exact_soft_tokens(version, coefficients):
    # Hidden states of 1e30 pool to p ~ 1e30, where R(p) ~ (a_6/|b_5|)·|p| is finite: the soft
    # tokens must be too, in float32, and agree with float64 and with an exact R of the pooled p.
    from iapt_fast import fit_rational

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    B, N, d, m, T = 3, 9, 16, 8, 4
    if coefficients == "gelu":
        num, den, _ = fit_rational("gelu", (6, 5), version)
    else:
        num, den = random_coefficients(6, 5, gen)
    w = dict(w_down=torch.randn(1, d, m, generator=gen) / d**0.5, w_pool=torch.randn(1, m, T, generator=gen),
             rat_num=num[None], rat_den=den[None], w_up=torch.randn(1, m, d, generator=gen) / m**0.5)
    hidden = torch.randn(B, N, d, generator=gen) * 1e30
    mask = torch.rand(B, N, generator=gen) < 0.7
    mask[0] = True
    mask[1] = False  # an all-masked row pools to p = 0
    out = prompt_generator(hidden, mask, **w, rational_version=version, backend="torch")
    w64 = {k: v.double() for k, v in w.items()}
    out64 = prompt_generator(hidden.double(), mask, **w64, rational_version=version, backend="torch")
    exact = _naive(hidden.double(), mask, w64, torch.zeros(B, dtype=torch.long), version,
                   act=lambda p, a, b, v: exact_batch(p, a, b, v)[0])
    tag = f"[seed={seed}]"
    assert torch.isfinite(out).all(), f"non-finite soft tokens {tag}"
    scale = exact.abs().max()
    assert (out64 - exact).abs().max() <= 1e-12 * scale, tag
    # float32 rounding of inputs, pooling and R only, as on O(1) inputs (measured: < 7e-7).
    assert (out.double() - out64).abs().max() <= 64 * torch.finfo(torch.float32).eps * scale, tag

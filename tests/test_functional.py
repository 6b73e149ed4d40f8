"""Validation and dispatch of iapt_fast.functional.prompt_generator."""
import pytest
import torch

from iapt_fast import prompt_generator
from iapt_fast.generator.functional import resolve_backend


def _args(B=2, N=3, d=8, m=4, T=4, A=1, dtype=torch.float32):
    return dict(
        hidden=torch.randn(B, N, d, dtype=dtype),
        mask=torch.ones(B, N, dtype=torch.bool),
        w_down=torch.randn(A, d, m),
        w_pool=torch.randn(A, m, T),
        rat_num=torch.randn(A, 7),
        rat_den=torch.randn(A, 5),
        w_up=torch.randn(A, m, d),
    )


def test_integer_mask_equals_bool_mask():
    args = _args()
    args["mask"] = torch.tensor([[1, 0, 1], [0, 1, 1]])
    out_int = prompt_generator(**args, backend="torch")
    args["mask"] = args["mask"].bool()
    torch.testing.assert_close(out_int, prompt_generator(**args, backend="torch"), rtol=0, atol=0)


def test_auto_picks_reference_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    args = _args()
    torch.testing.assert_close(prompt_generator(**args), prompt_generator(**args, backend="torch"), rtol=0, atol=0)


def test_weights_in_another_dtype_than_hidden():
    args = _args(dtype=torch.bfloat16)
    out = prompt_generator(**args)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "change,exc,words",
    [
        (dict(hidden=torch.randn(2, 3)), ValueError, "hidden must be \\[B, N, d\\]"),
        (dict(hidden=torch.randint(0, 3, (2, 3, 8))), TypeError, "hidden must have dtype"),
        (dict(hidden=[1, 2]), TypeError, "hidden must be a torch.Tensor"),
        (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask must be \\[B, N\\]"),
        (dict(mask=torch.ones(2, 3)), TypeError, "mask must be bool or an integer"),
        (dict(w_down=torch.randn(1, 9, 4)), ValueError, "w_down must be \\[A, d=8, m\\]"),
        (dict(w_down=torch.randn(8, 4)), ValueError, "w_down must be"),
        (dict(w_pool=torch.randn(1, 5, 4)), ValueError, "w_pool must be"),
        (dict(rat_num=torch.randn(1, 0)), ValueError, "rat_num must be"),
        (dict(rat_num=torch.randn(7)), ValueError, "rat_num must be"),
        (dict(rat_den=torch.randn(2, 5)), ValueError, "rat_den must be"),
        (dict(w_up=torch.randn(1, 4, 9)), ValueError, "w_up must be"),
        (dict(w_up=torch.randn(1, 4, 8, dtype=torch.float64)), TypeError, "share one dtype"),
        (dict(w_pool=torch.randint(0, 2, (1, 4, 4))), TypeError, "w_pool must have dtype"),
    ],
)
def test_bad_arguments_are_named(change, exc, words):
    args = _args()
    args.update(change)
    with pytest.raises(exc, match=words):
        prompt_generator(**args)


def test_adapter_id_errors():
    args = _args(A=3)
    with pytest.raises(ValueError, match="adapter_ids is required"):
        prompt_generator(**args)
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[0, 3\)"):
        prompt_generator(**args, adapter_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[0, 3\)"):
        prompt_generator(**args, adapter_ids=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"adapter_ids must be \[B=2\]"):
        prompt_generator(**args, adapter_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="adapter_ids must be an integer tensor"):
        prompt_generator(**args, adapter_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="adapter_ids must be a torch.Tensor"):
        prompt_generator(**args, adapter_ids=[0, 1])
    out = prompt_generator(**args, adapter_ids=torch.tensor([2, 0], dtype=torch.int32))
    assert out.shape == (2, 4, 8)


def test_backend_and_version_errors():
    args = _args()
    with pytest.raises(ValueError, match="backend must be one of"):
        prompt_generator(**args, backend="cuda")
    with pytest.raises(ValueError, match="rational_version must be"):
        prompt_generator(**args, rational_version="C")
    with pytest.raises(TypeError, match="hidden must have dtype"):
        prompt_generator(**{**args, "hidden": args["hidden"].double()}, backend="triton")
    with pytest.raises(ValueError, match="T <= 16"):
        prompt_generator(**{**args, "w_pool": torch.randn(1, 4, 17)}, backend="triton")


def test_check_ids_false_skips_only_the_range_check():
    args = _args(A=3)
    ids = torch.tensor([2, 0])
    torch.testing.assert_close(prompt_generator(**args, adapter_ids=ids, check_ids=False),
                               prompt_generator(**args, adapter_ids=ids), rtol=0, atol=0)
    # Shape and dtype checks still run.
    with pytest.raises(ValueError, match=r"adapter_ids must be \[B=2\]"):
        prompt_generator(**args, adapter_ids=torch.tensor([0]), check_ids=False)


def test_masked_nan_has_no_influence_on_the_reference():
    args = _args(B=3, N=5)
    args["mask"] = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    clean = prompt_generator(**args, backend="torch")
    dirty = dict(args, hidden=args["hidden"].clone().requires_grad_(True))
    with torch.no_grad():
        dirty["hidden"][~args["mask"]] = float("nan")
        dirty["hidden"][2, 0] = float("inf")
    out = prompt_generator(**dirty, backend="torch")
    torch.testing.assert_close(out, clean, rtol=0, atol=0)
    out.sum().backward()
    assert (dirty["hidden"].grad[~args["mask"]] == 0).all()


def test_all_masked_row_is_rational_of_zero_times_w_up():
    # The documented contract: no instruction token → p = 0 → anchor + s·R(0)·W_up.
    from iapt_fast.generator.rational import rational

    args = _args(B=2, N=4)
    args["mask"] = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    anchor, scale = torch.randn(1, 4, 8), torch.tensor([1.7])
    out = prompt_generator(**args, anchor=anchor, anchor_scale=scale, backend="torch")
    r0 = rational(torch.zeros(1, 4), args["rat_num"][0], args["rat_den"][0], "B")
    expected = anchor[0] + scale[0] * (r0 @ args["w_up"][0])
    torch.testing.assert_close(out[0], expected, rtol=1e-6, atol=1e-6)
    empty = prompt_generator(**dict(args, hidden=args["hidden"][:, :0], mask=args["mask"][:, :0]),
                             anchor=anchor, anchor_scale=scale, backend="torch")
    torch.testing.assert_close(empty[0], expected, rtol=1e-6, atol=1e-6)


def test_unimportable_kernels_say_why(monkeypatch):
    # E.g. triton missing: backend="triton" is refused naming the backend and the import error.
    import sys

    monkeypatch.setitem(sys.modules, "iapt_fast.kernels", None)
    with pytest.raises(ValueError, match=r"backend='triton' is unavailable: .*iapt_fast\.kernels"):
        prompt_generator(**_args(), backend="triton")

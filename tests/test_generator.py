"""GeneratorBank: layout, initialisation, gradients, stacking."""
import pytest
import torch

from iapt_fast import GeneratorBank, IAPTConfig, fit_rational, prompt_generator


def test_layout_and_init():
    cfg = IAPTConfig(bottleneck_dim=6, num_soft_tokens=3, rational_degrees=(4, 3), target_layers=[1, 2])
    bank = GeneratorBank(hidden_size=10, num_layers=3)
    adapter = bank.add_adapter("a", cfg, seed=0)
    assert adapter.layer_indices == [1, 2] and 0 not in adapter
    w = bank.stacked_weights(1, ["a"])
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "w_down": (1, 10, 6), "w_pool": (1, 6, 3), "rat_num": (1, 5), "rat_den": (1, 3), "w_up": (1, 6, 10)}
    num, den, _ = fit_rational("gelu", (4, 3), "B")
    torch.testing.assert_close(w["rat_num"][0], num)
    torch.testing.assert_close(w["rat_den"][0], den)
    assert (w["w_up"] != 0).all()
    # Same seed, same weights; layers differ from each other.
    other = GeneratorBank(10, 3)
    other.add_adapter("a", cfg, seed=0)
    torch.testing.assert_close(other.stacked_weights(2, ["a"])["w_down"], bank.stacked_weights(2, ["a"])["w_down"])
    assert not torch.equal(bank.stacked_weights(1, ["a"])["w_down"], bank.stacked_weights(2, ["a"])["w_down"])


def test_every_parameter_gets_a_gradient_first_step():
    cfg = IAPTConfig(bottleneck_dim=8)
    bank = GeneratorBank(16, 2)
    bank.add_adapter("a", cfg, seed=1)
    hidden = torch.randn(3, 6, 16)
    mask = torch.ones(3, 6, dtype=torch.bool)
    loss = sum(prompt_generator(hidden, mask, **bank.stacked_weights(l, ["a"])).pow(2).sum() for l in range(2))
    loss.backward()
    for name, param in bank.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_stacking_mixed_adapters_and_gradients_stay_separate():
    cfg = IAPTConfig(bottleneck_dim=8)
    bank = GeneratorBank(16, 1)
    for i, name in enumerate("abc"):
        bank.add_adapter(name, cfg, seed=i)
    w = bank.stacked_weights(0, ["c", "a"])
    torch.testing.assert_close(w["w_down"][0], bank["c"][0].w_down)
    hidden = torch.randn(2, 4, 16)
    mask = torch.ones(2, 4, dtype=torch.bool)
    prompt_generator(hidden, mask, **w, adapter_ids=torch.tensor([1, 1])).sum().backward()
    assert bank["a"][0].w_up.grad.abs().sum() > 0
    assert bank["c"][0].w_up.grad is None or bank["c"][0].w_up.grad.abs().sum() == 0
    assert bank["b"][0].w_up.grad is None


def test_bank_errors():
    bank = GeneratorBank(16, 2)
    bank.add_adapter("a", IAPTConfig(bottleneck_dim=8))
    bank.add_adapter("b", IAPTConfig(bottleneck_dim=4, target_layers=[1]))
    with pytest.raises(ValueError, match="already loaded"):
        bank.add_adapter("a", IAPTConfig())
    with pytest.raises(ValueError, match="unknown adapter 'z'"):
        bank.stacked_weights(0, ["z"])
    with pytest.raises(ValueError, match="no generator at layer 0"):
        bank.stacked_weights(0, ["b"])
    with pytest.raises(ValueError, match="different generator shapes"):
        bank.stacked_weights(1, ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        bank.stacked_weights(1, [])
    with pytest.raises(ValueError, match="non-empty string"):
        bank.add_adapter("", IAPTConfig())
    bank.delete_adapter("b")
    assert bank.adapter_names == ["a"]
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        bank.delete_adapter("b")

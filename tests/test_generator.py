"""GeneratorBank: layout, initialisation, gradients, stacking."""
import pytest
import torch

from iapt_fast import GeneratorBank, IAPTConfig, fit_rational, prompt_generator


def anchors(layers, tokens=4, dim=16, seed=0):
    """Stand-ins for the backbone's hidden states of an init sequence: {layer: [T, d]}."""
    gen = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(tokens, dim, generator=gen) * (layer + 1) for layer in layers}


def test_layout_and_init():
    cfg = IAPTConfig(bottleneck_dim=6, num_soft_tokens=3, rational_degrees=(4, 3), target_layers=[1, 2])
    bank = GeneratorBank(hidden_size=10, num_layers=3)
    start = anchors([1, 2], 3, 10)
    adapter = bank.add_adapter("a", cfg, seed=0, anchors=start)
    assert adapter.layer_indices == [1, 2] and 0 not in adapter
    w = bank.stacked_weights(1, ["a"])
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "w_down": (1, 10, 6), "w_pool": (1, 6, 3), "rat_num": (1, 5), "rat_den": (1, 3), "w_up": (1, 6, 10),
        "anchor": (1, 3, 10), "anchor_scale": (1,)}
    # The anchor starts at the given states (a copy: training it never writes into them); the
    # scale is their RMS, a buffer that no optimiser sees.
    torch.testing.assert_close(w["anchor"][0], start[1])
    assert w["anchor"].data_ptr() != start[1].data_ptr()
    torch.testing.assert_close(w["anchor_scale"][0], start[1].pow(2).mean().sqrt())
    assert "layers.1.anchor_scale" not in dict(adapter.named_parameters())
    unscaled = GeneratorBank(10, 3).add_adapter("a", IAPTConfig(bottleneck_dim=6, num_soft_tokens=3, anchor_scaled=False,
                                                                target_layers=[1]), anchors=start)
    assert float(unscaled[1].anchor_scale) == 1.0
    paper = GeneratorBank(10, 3).add_adapter("p", IAPTConfig.paper(bottleneck_dim=6, num_soft_tokens=3), seed=0)
    assert set(paper[0].weights()) == {"w_down", "w_pool", "rat_num", "rat_den", "w_up"}
    num, den, _ = fit_rational("gelu", (4, 3), "B")
    torch.testing.assert_close(w["rat_num"][0], num)
    torch.testing.assert_close(w["rat_den"][0], den)
    assert (w["w_up"] != 0).all()
    # Same seed, same weights; layers differ from each other.
    other = GeneratorBank(10, 3)
    other.add_adapter("a", cfg, seed=0, anchors=start)
    torch.testing.assert_close(other.stacked_weights(2, ["a"])["w_down"], bank.stacked_weights(2, ["a"])["w_down"])
    assert not torch.equal(bank.stacked_weights(1, ["a"])["w_down"], bank.stacked_weights(2, ["a"])["w_down"])


def test_every_parameter_gets_a_gradient_first_step():
    cfg = IAPTConfig(bottleneck_dim=8)
    bank = GeneratorBank(16, 2)
    bank.add_adapter("a", cfg, seed=1, anchors=anchors([0, 1]))
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
        bank.add_adapter(name, cfg, seed=i, anchors=anchors([0], seed=i))
    w = bank.stacked_weights(0, ["c", "a"])
    torch.testing.assert_close(w["w_down"][0], bank["c"][0].w_down)
    hidden = torch.randn(2, 4, 16)
    mask = torch.ones(2, 4, dtype=torch.bool)
    prompt_generator(hidden, mask, **w, adapter_ids=torch.tensor([1, 1])).sum().backward()
    assert bank["a"][0].w_up.grad.abs().sum() > 0 and bank["a"][0].anchor.grad.abs().sum() > 0
    assert bank["c"][0].w_up.grad is None or bank["c"][0].w_up.grad.abs().sum() == 0
    assert bank["c"][0].anchor.grad is None or bank["c"][0].anchor.grad.abs().sum() == 0
    assert bank["b"][0].w_up.grad is None


def test_bank_errors():
    bank = GeneratorBank(16, 2)
    bank.add_adapter("a", IAPTConfig(bottleneck_dim=8), anchors=anchors([0, 1]))
    bank.add_adapter("b", IAPTConfig(bottleneck_dim=4, target_layers=[1]), anchors=anchors([1]))
    with pytest.raises(ValueError, match="already loaded"):
        bank.add_adapter("a", IAPTConfig(), anchors=anchors([0, 1]))
    with pytest.raises(ValueError, match="needs anchors"):
        bank.add_adapter("z", IAPTConfig())
    with pytest.raises(ValueError, match=r"needs its anchor \[T=4, d=16\]"):
        bank.add_adapter("z", IAPTConfig(), anchors=anchors([0, 1], tokens=3))
    assert "z" not in bank.adapter_names
    bank.add_adapter("p", IAPTConfig.paper(bottleneck_dim=8))
    with pytest.raises(ValueError, match="different generator shapes"):
        bank.stacked_weights(0, ["a", "p"])  # the anchored and the paper's form never share a stack
    with pytest.raises(ValueError, match="unknown adapter 'z'"):
        bank.stacked_weights(0, ["z"])
    with pytest.raises(ValueError, match="no generator at layer 0"):
        bank.stacked_weights(0, ["b"])
    with pytest.raises(ValueError, match="different generator shapes"):
        bank.stacked_weights(1, ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        bank.stacked_weights(1, [])
    with pytest.raises(ValueError, match="non-empty string"):
        bank.add_adapter("", IAPTConfig.paper())
    bank.delete_adapter("b")
    bank.delete_adapter("p")
    assert bank.adapter_names == ["a"]
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        bank.delete_adapter("b")

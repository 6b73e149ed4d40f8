"""IAPTConfig(anchors_only=True): the anchored form with the generator term switched off.

Its soft tokens are the anchors alone (P_l = B_l, whatever the generator weights hold), so an
untrained one is the frozen model with its init sequence prepended; training moves the anchors
and nothing else; it saves and loads as any adapter.
"""
from __future__ import annotations

import pytest
import torch

from iapt_fast import IAPTConfig, IAPTModel, get_iapt_model
from iapt_fast.generator import functional
from slow_reference import padded_batch, tiny_model
from test_anchored import prepend

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4


def test_soft_tokens_are_the_anchors_whatever_the_generator_holds():
    wrapped = get_iapt_model(tiny_model("llama", "sdpa"), IAPTConfig(bottleneck_dim=8, init_std_up=0.5,
                                                                     anchors_only=True), seed=3, backend="torch")
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(3, 7, wrapped.config.hidden_size, generator=gen)
    mask = torch.rand(3, 7, generator=gen) > 0.3
    for layer in wrapped.generators["default"].layer_indices:
        w = wrapped.generator_weights(layer)
        assert w["w_up"].abs().max() > 0.1  # a generator term that would matter if it were on
        out = functional.prompt_generator(hidden, mask, **w, backend="torch")
        assert torch.equal(out, w["anchor"].expand_as(out))


def test_untrained_anchors_only_is_the_backbone_with_the_init_sequence_prepended():
    model = tiny_model("llama", "sdpa")
    wrapped = get_iapt_model(model, IAPTConfig(bottleneck_dim=8, init_std_up=0.5, anchors_only=True), seed=3,
                             backend="torch")
    ids, mask, _ = padded_batch(3, 9, "left", seed=5)
    full, full_mask = prepend([1, 1, 1, 1], ids, mask)
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask).logits
        ref = model(input_ids=full, attention_mask=full_mask).logits
    for b in range(len(ids)):
        n = int(mask[b].sum())
        assert (out[b][mask[b].bool()] - ref[b, -n:]).abs().max().item() <= TOL


def test_training_moves_only_the_anchors_and_the_count_matches_the_config(tmp_path):
    cfg = IAPTConfig(bottleneck_dim=8, init_std_up=0.5, anchors_only=True)
    wrapped = get_iapt_model(tiny_model("llama", "sdpa"), cfg, seed=3, backend="torch")
    hidden, layers = wrapped.config.hidden_size, wrapped.config.num_hidden_layers
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".anchor") for n in trainable)
    assert wrapped.num_trainable_parameters() == cfg.num_parameters(hidden, layers) == 4 * hidden * layers
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    ids, mask, _ = padded_batch(4, 9, "right", seed=7)
    labels = ids.masked_fill(~mask.bool(), -100)
    labels[:, :4] = -100
    for _ in range(3):
        loss = wrapped(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, p in wrapped.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        assert moved == (name in trainable), name
    # set_adapter keeps the rule; a saved anchors-only adapter loads to the same outputs.
    wrapped.set_adapter("default")
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad} == trainable
    wrapped.save_pretrained(tmp_path)
    probe, probe_mask, _ = padded_batch(2, 6, "left", seed=9)
    with torch.no_grad():
        want = wrapped(input_ids=probe, attention_mask=probe_mask).logits
    backbone = wrapped.remove_hooks()
    loaded = IAPTModel.from_pretrained(backbone, tmp_path, backend="torch")
    assert loaded.peft_config["default"].anchors_only
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=probe, attention_mask=probe_mask).logits, want)


def test_anchors_only_needs_the_anchored_form():
    with pytest.raises(ValueError, match="anchors_only=True needs generator_form"):
        IAPTConfig.paper(anchors_only=True)
    with pytest.raises(ValueError, match="anchors_only must be a bool"):
        IAPTConfig(anchors_only=1)

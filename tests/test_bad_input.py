"""Bad input to the model integration: a clear error naming the argument, before any work."""
from __future__ import annotations

import pytest
import torch

from iapt_fast import IAPTConfig, IAPTModel, get_iapt_model
from iapt_fast.model.prefix_hooks import hooks_installed_on
from slow_reference import padded_batch, tiny_model


def _wrap(model, **overrides):
    cfg = dict(bottleneck_dim=8, init_std_up=0.5)
    cfg.update(overrides)
    return get_iapt_model(model, IAPTConfig(**cfg), seed=1, backend="torch")


def test_malformed_batches_name_the_argument():
    wrapped = _wrap(tiny_model("llama"))
    ids, mask, _ = padded_batch(2, 6, "left", seed=3)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, N\].*batch axis"):
        wrapped(input_ids=ids[0])
    with pytest.raises(ValueError, match=r"input_ids must be \[B, N\].*batch axis"):
        wrapped.generate(ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one row"):
        wrapped(input_ids=ids[:0], attention_mask=mask[:0])
    with pytest.raises(ValueError, match="at least one row"):
        wrapped.generate(ids[:0], attention_mask=mask[:0], max_new_tokens=2)
    with pytest.raises(TypeError, match="input_ids must be integer token ids"):
        wrapped(input_ids=ids.float())
    with pytest.raises(ValueError, match=r"labels must be a \[B, N\] = \(2, 6\)"):
        wrapped(input_ids=ids, attention_mask=mask, instruction_mask=mask, labels=ids[:, :4])
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[B, N, d\]"):
        wrapped(inputs_embeds=torch.randn(6, 32))


def test_reentrant_checkpointing_is_refused_with_the_fix():
    model = tiny_model("llama")
    wrapped = _wrap(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    wrapped.train()
    ids, mask, _ = padded_batch(2, 6, "none", seed=4)
    labels = ids.clone()
    labels[:, :3] = -100
    with pytest.raises(ValueError, match="non-reentrant activation checkpointing.*use_reentrant': False"):
        wrapped(input_ids=ids, attention_mask=mask, labels=labels)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in wrapped.generators.parameters()
               if p.requires_grad)


def test_sliding_window_setups_that_would_decode_wrong_are_refused():
    from slow_reference import slow_greedy, slow_logits

    model = tiny_model("mistral", layers=3)
    model.config.sliding_window = 14
    with pytest.raises(ValueError, match="sliding_window=14 must exceed num_soft_tokens=14"):
        _wrap(model, num_soft_tokens=14)
    assert not hooks_installed_on(model)  # refused before wrapping: still wrappable
    # Partial target layers: right while the window cannot roll over (T + tokens <= W - 1) ...
    wrapped = _wrap(model, target_layers=[1])
    weights = {1: wrapped.generators["default"][1].weights()}
    ids, mask, inst = padded_batch(2, 5, "left", seed=5)
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst).logits
    ref = slow_logits(model, weights, ids, mask, inst)
    assert (out - ref).abs().max().item() <= 1e-4
    tokens = wrapped.generate(ids, attention_mask=mask, instruction_mask=inst, max_new_tokens=4, min_new_tokens=4,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, slow_greedy(model, weights, ids, mask, inst, 4))
    # ... and refused, before any work, once it would (where decoding used to go silently wrong)
    with pytest.raises(ValueError, match="a sequence of 10 tokens plus T=4 prefix slots overflows the sliding window \\(14\\)"):
        wrapped.generate(ids, attention_mask=mask, instruction_mask=inst, max_new_tokens=5, pad_token_id=0)
    with pytest.raises(ValueError, match="overflows the sliding window"):  # manual decoding past the window
        with torch.no_grad():
            step = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, use_cache=True)
            cache = step.past_key_values
            nxt = step.logits[:, -1:].argmax(-1)
            for _ in range(6):
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                step = wrapped(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
                nxt = step.logits[:, -1:].argmax(-1)
    full = _wrap(tiny_model("mistral", layers=3))  # every layer targeted: any length is literal prepending
    full.base_model.config.sliding_window = 3  # changed after wrapping: refused at the next call
    with pytest.raises(ValueError, match="sliding_window=3 must exceed"):
        full(input_ids=ids, attention_mask=mask[:, :5])
    qwen = tiny_model("qwen2", layers=2)
    qwen.config.layer_types = ["full_attention", "sliding_attention"]
    qwen.config.sliding_window = 8
    with pytest.raises(ValueError, match="qwen2 with sliding-window attention.*not supported"):
        _wrap(qwen)


def test_backend_limits_are_checked_when_the_adapter_is_added():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"config \(backend='triton'\): T=17 soft tokens exceed the Triton backend's "
                                         r"limit of T <= 16"):
        get_iapt_model(model, IAPTConfig(num_soft_tokens=17, bottleneck_dim=8), backend="triton")
    wrapped = get_iapt_model(model, IAPTConfig(num_soft_tokens=17, bottleneck_dim=8), backend="torch")
    assert wrapped.peft_config["default"].num_soft_tokens == 17


@pytest.mark.parametrize("field,value", [
    ("init_std_up", float("inf")), ("init_std_up", float("nan")), ("init_std_up", -1.0),
    ("rational_fit_interval", (float("-inf"), 1.0)), ("rational_fit_interval", (0.0, float("nan"))),
    ("rational_fit_interval", (1.0, 1.0)), ("num_soft_tokens", 2.0), ("bottleneck_dim", True),
])
def test_config_rejects_values_that_cannot_work(field, value):
    with pytest.raises(ValueError, match=field):
        IAPTConfig(**{field: value})


def test_unloaded_host_says_how_to_pick_an_adapter(tmp_path):
    host = IAPTModel(tiny_model("llama"), None, backend="torch")
    _wrap(tiny_model("llama")).save_pretrained(tmp_path / "a")
    host.load_adapter(tmp_path / "a", "a")
    host.delete_adapter("a")
    ids, mask, _ = padded_batch(1, 4, "none", seed=6)
    with pytest.raises(ValueError, match="no adapter is loaded"):
        host(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_finite_weights_that_overflow_are_refused_naming_the_adapter(tmp_path, family):
    """A finite weight too large for float32 passes the load's checks; the call that meets the
    overflow is refused, naming the adapter, instead of returning NaN logits."""
    from safetensors.torch import load_file, save_file

    from iapt_fast.model.adapter_io import WEIGHTS_NAME

    wrapped = _wrap(tiny_model(family))
    wrapped.add_adapter("good", seed=2)
    wrapped.save_pretrained(tmp_path / "huge")
    weights = load_file(tmp_path / "huge" / WEIGHTS_NAME)
    weights["layers.1.w_down"] = torch.full_like(weights["layers.1.w_down"], 1e38)
    save_file(weights, tmp_path / "huge" / WEIGHTS_NAME)
    wrapped.load_adapter(tmp_path / "huge", "huge")
    ids, mask, inst = padded_batch(3, 6, "left", seed=4)
    with torch.no_grad():
        bare = wrapped.base_model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(bare).all()
    wrapped.set_adapter("huge")  # trainable: a forward with gradients stacks it per call
    for call in (lambda rows: wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, adapter_names=rows),
                 lambda rows: wrapped.generate(ids, attention_mask=mask, adapter_names=rows, max_new_tokens=2,
                                               pad_token_id=0)):
        with torch.no_grad(), pytest.raises(ValueError, match=r"adapter 'huge' produced non-finite soft tokens .*"
                                                               r"rows \[1\]"):
            call(["good", "huge", "__base__"])
        with pytest.raises(ValueError, match=r"adapter 'huge' produced non-finite.*rows \[0, 1\]"):
            call(["huge", "huge", "good"])  # forward: the training path, gradients on
    with torch.no_grad():  # the others still serve, finitely
        fine = wrapped(input_ids=ids, attention_mask=mask, adapter_names=["good", "default", "__base__"]).logits
    assert torch.isfinite(fine).all()

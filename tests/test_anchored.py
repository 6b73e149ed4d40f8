"""The anchored form P_l = B_l + s_l · R(p)·W_up: its start, its contract, save/load.

With the generator term at zero, an anchored adapter must BE the frozen model with its init
sequence prepended: the soft tokens of layer l are that sequence's input hidden states of
layer l, and they enter layer l as if prepended to its input.
"""
from __future__ import annotations

import json

import pytest
import torch

from iapt_fast.generator.tolerance import assert_close_by_rule
from iapt_fast import IAPTConfig, IAPTModel, get_iapt_model
from iapt_fast.generator import functional
from iapt_fast.generator.weights import GeneratorWeights
from iapt_fast.generator import reference
from iapt_fast.model.anchor import anchor_token_ids
from iapt_fast.model.prefix_hooks import hooks_installed_on
from slow_reference import padded_batch, slow_logits, tiny_model
from train_fixtures import make_llama, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4


def zero_generator_term(wrapped: IAPTModel) -> None:
    with torch.no_grad():
        for gen in wrapped.generators[wrapped.active_adapter].layers.values():
            gen.w_up.zero_()


def prepend(prefix: list[int], ids: torch.Tensor, mask: torch.Tensor):
    """Left-padded batch of ``prefix + row`` for every row (its real tokens), with positions."""
    rows = [torch.cat([torch.tensor(prefix), ids[b][mask[b].bool()]]) for b in range(len(ids))]
    width = max(len(r) for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.long)
    out_mask = torch.zeros_like(out)
    for b, r in enumerate(rows):
        out[b, width - len(r):], out_mask[b, width - len(r):] = r, 1
    return out, out_mask


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_zero_generator_term_is_the_backbone_with_the_init_text_prepended(family, attn):
    model = tiny_model(family, attn)
    wrapped = get_iapt_model(model, IAPTConfig(bottleneck_dim=8), seed=3, backend="torch")
    init = anchor_token_ids(wrapped.peft_config["default"], model)
    assert init == [1, 1, 1, 1]  # T copies of BOS: the tokenizer-free default
    zero_generator_term(wrapped)
    ids, mask, _ = padded_batch(3, 9, "left", seed=5)
    full, full_mask = prepend(init, ids, mask)
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask).logits
        ref = model(input_ids=full, attention_mask=full_mask).logits  # the bare backbone (no request)
        plain = model(input_ids=ids, attention_mask=mask).logits
    for b in range(len(ids)):
        n = int(mask[b].sum())
        err = (out[b][mask[b].bool()] - ref[b, -n:]).abs().max().item()
        assert err <= TOL, f"row {b}: {err:.2e} from the backbone on init text + input"
        assert (plain[b][mask[b].bool()] - ref[b, -n:]).abs().max().item() > 100 * TOL  # not vacuous
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    tokens = wrapped.generate(ids, attention_mask=mask, **kw)
    expected = model.generate(input_ids=full, attention_mask=full_mask, **kw)
    assert torch.equal(tokens[:, -6:], expected[:, -6:])


def test_text_init_uses_the_first_tokens_of_the_text_cycled():
    tok = make_tokenizer()
    model = make_llama(len(tok))
    cfg = IAPTConfig(bottleneck_dim=8, anchor_init="text", prompt_init_text="good movie")
    text_ids = tok("good movie", add_special_tokens=False)["input_ids"]
    assert len(text_ids) < 4
    expected = (text_ids * 4)[:4]
    assert anchor_token_ids(cfg, model, tok) == expected
    with pytest.raises(ValueError, match="needs a tokenizer"):
        get_iapt_model(model, cfg)
    assert not hooks_installed_on(model)  # a failed wrap leaves the model wrappable
    wrapped = get_iapt_model(model, cfg, tokenizer=tok, backend="torch")
    zero_generator_term(wrapped)
    ids = torch.tensor([tok("bad plot", add_special_tokens=False)["input_ids"]])
    full = torch.cat([torch.tensor([expected]), ids], dim=1)
    with torch.no_grad():
        out = wrapped(input_ids=ids).logits
        ref = model(input_ids=full).logits[:, 4:]
    assert (out - ref).abs().max().item() <= TOL


def test_anchored_model_matches_the_slow_reference_and_trains_every_part():
    model = tiny_model("llama", "sdpa")
    wrapped = get_iapt_model(model, IAPTConfig(bottleneck_dim=8, init_std_up=0.5), seed=2, backend="torch")
    adapter = wrapped.generators["default"]
    ids, mask, inst = padded_batch(3, 8, "left", seed=9)
    labels = ids.masked_fill(mask == 0, -100)
    wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, labels=labels).loss.backward()
    weights = {layer: {k: v.detach().clone().requires_grad_(k != "anchor_scale") for k, v in
                       adapter[layer].weights().items()} for layer in adapter.layer_indices}
    ref = slow_logits(model, weights, ids, mask, inst)
    loss = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    for layer in adapter.layer_indices:
        for name in ("w_down", "w_pool", "rat_num", "rat_den", "w_up", "anchor"):
            got = getattr(adapter[layer], name).grad
            want = weights[layer][name].grad[0]
            assert got is not None and got.abs().sum() > 0, f"layer {layer} {name}: no gradient"
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"layer {layer} {name}")
        assert adapter[layer].anchor_scale.grad is None  # a fixed scale


def test_functional_anchor_matches_float64_oracle_and_validates():
    gen = torch.Generator().manual_seed(11)
    A, B, N, d, m, T = 3, 4, 6, 16, 8, 4
    hidden = torch.randn(B, N, d, generator=gen)
    mask = torch.rand(B, N, generator=gen) < 0.8
    mask[:, 0] = True
    w = dict(w_down=torch.randn(A, d, m, generator=gen) / 4, w_pool=torch.randn(A, m, T, generator=gen) / 3,
             rat_num=torch.randn(A, 7, generator=gen) / 5, rat_den=torch.randn(A, 5, generator=gen) / 5,
             w_up=torch.randn(A, m, d, generator=gen) / 3)
    anchor = torch.randn(A, T, d, generator=gen)
    scale = torch.rand(A, generator=gen) + 0.5
    ids = torch.tensor([2, 0, 2, 1])
    out = functional.prompt_generator(hidden, mask, **w, adapter_ids=ids, anchor=anchor, anchor_scale=scale,
                                      backend="torch")
    plain = functional.prompt_generator(hidden, mask, **w, adapter_ids=ids, backend="torch")
    oracle = anchor.double()[ids] + scale.double()[ids][:, None, None] * plain.double()
    assert_close_by_rule(out, oracle, oracle.float(), "anchored output")
    f64 = reference.prompt_generator(hidden.double(), mask, GeneratorWeights(*(v.double() for v in w.values()),
                                     anchor=anchor.double(), anchor_scale=scale.double()), ids)
    assert (f64 - oracle).abs().max() < 1e-5
    bad = [
        (dict(anchor=anchor[:, :2]), ValueError, r"anchor must be \[A, T, d\] = \(3, 4, 16\)"),
        (dict(anchor=anchor.double()), TypeError, "anchor must have the weights' dtype"),
        (dict(anchor_scale=scale[:2]), ValueError, r"anchor_scale must be \[A\] = \(3,\)"),
        (dict(anchor_scale=[1.0, 1.0, 1.0]), TypeError, "anchor_scale must be a torch.Tensor"),
    ]
    for kwargs, err, match in bad:
        with pytest.raises(err, match=match):
            functional.prompt_generator(hidden, mask, **w, adapter_ids=ids, backend="torch", **kwargs)
    if functional.triton_available():
        with pytest.raises(ValueError, match="anchor_scale must not require grad on the Triton backend"):
            functional.prompt_generator(hidden, mask, **w, adapter_ids=ids, backend="triton", anchor=anchor,
                                        anchor_scale=scale.clone().requires_grad_(True))


def test_save_load_round_trip_keeps_anchor_and_scale(tmp_path):
    model = tiny_model("qwen3", "sdpa")
    wrapped = get_iapt_model(model, IAPTConfig(bottleneck_dim=8, init_std_up=0.3), seed=4, backend="torch")
    with torch.no_grad():
        for gen in wrapped.generators["default"].layers.values():
            gen.anchor.add_(torch.randn_like(gen.anchor))  # trained away from its start
    ids, mask, _ = padded_batch(2, 7, "left", seed=13)
    with torch.no_grad():
        before = wrapped(input_ids=ids, attention_mask=mask).logits
    wrapped.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["generator_form"] == "anchored" and saved["pool_input"] == "normed"
    wrapped.remove_hooks()
    loaded = IAPTModel.from_pretrained(model, tmp_path / "a", backend="torch")
    for layer in (0, 1):
        for k, v in wrapped.generators["default"][layer].weights().items():
            assert torch.equal(loaded.generators["default"][layer].weights()[k], v), k
    with torch.no_grad():
        after = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)


def test_adapter_files_from_before_the_anchored_form_load_as_before(tmp_path):
    model = tiny_model("llama", "sdpa")
    old = get_iapt_model(model, IAPTConfig.paper(bottleneck_dim=8, init_std_up=0.3), seed=6, backend="torch")
    ids, mask, _ = padded_batch(2, 7, "left", seed=17)
    with torch.no_grad():
        before = old(input_ids=ids, attention_mask=mask).logits
    old.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "adapter_config.json"
    data = json.loads(path.read_text())
    for key in ("generator_form", "anchor_init", "prompt_init_text", "anchor_scaled"):
        del data[key]  # what a file written before these fields existed holds
    path.write_text(json.dumps(data))
    old.remove_hooks()
    loaded = IAPTModel.from_pretrained(model, tmp_path / "old", backend="torch")
    assert loaded.peft_config["default"].generator_form == "paper"
    with torch.no_grad():
        after = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)


def test_mixed_batch_of_anchored_and_paper_adapters_rows_equal_single_runs():
    wrapped = get_iapt_model(tiny_model("llama", "sdpa"), IAPTConfig(bottleneck_dim=8, init_std_up=0.5),
                             adapter_name="anchored", seed=1, backend="torch")
    wrapped.add_adapter("anchored2", IAPTConfig(bottleneck_dim=8, init_std_up=0.5, anchor_scaled=False), seed=2)
    wrapped.add_adapter("paper", IAPTConfig.paper(bottleneck_dim=8, init_std_up=0.5), seed=3)
    names = ["paper", "anchored", "__base__", "anchored2", "anchored"]
    ids, mask, _ = padded_batch(len(names), 8, "left", seed=19)
    with torch.no_grad():
        mixed = wrapped(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for row, name in enumerate(names):
            alone = wrapped(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], adapter_names=[name]).logits
            err = (mixed[row] - alone[0])[mask[row].bool()].abs().max().item()
            assert err <= TOL, f"row {row} ({name}): {err:.2e}"
    tokens = wrapped.generate(ids, attention_mask=mask, adapter_names=names, max_new_tokens=3, do_sample=False,
                              pad_token_id=0)
    for row, name in enumerate(names):
        keep = mask[row].bool()
        single = wrapped.generate(ids[row][keep][None], adapter_names=[name], max_new_tokens=3, do_sample=False,
                                  pad_token_id=0)
        assert torch.equal(tokens[row, -3:], single[0, -3:]), f"row {row} ({name})"


def test_config_validation_and_presets():
    assert IAPTConfig().generator_form == "anchored" and IAPTConfig().pool_input == "normed"
    paper = IAPTConfig.paper()
    assert (paper.generator_form, paper.pool_input, paper.anchored) == ("paper", "hidden", False)
    with pytest.raises(ValueError, match="generator_form must be one of"):
        IAPTConfig(generator_form="fancy")
    with pytest.raises(ValueError, match="anchor_init must be one of"):
        IAPTConfig(anchor_init="eos")
    with pytest.raises(ValueError, match='anchor_init="text" needs prompt_init_text'):
        IAPTConfig(anchor_init="text")
    with pytest.raises(ValueError, match="prompt_init_text must be a non-empty string"):
        IAPTConfig(prompt_init_text="  ")
    with pytest.raises(ValueError, match="anchor_scaled must be a bool"):
        IAPTConfig(anchor_scaled=1)
    round_trip = IAPTConfig.from_json_string(IAPTConfig(anchor_init="text", prompt_init_text="hi").to_json_string())
    assert round_trip == IAPTConfig(anchor_init="text", prompt_init_text="hi")


def test_bos_init_needs_a_bos_or_eos_token():
    model = tiny_model("llama", "sdpa")
    model.config.bos_token_id = None
    model.config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="names a bos_token_id or eos_token_id"):
        get_iapt_model(model, IAPTConfig(bottleneck_dim=8))
    assert get_iapt_model(model, IAPTConfig.paper(bottleneck_dim=8)).adapter_names == ["default"]


def test_training_without_instruction_mask_pools_over_the_prompt_only():
    # A causal-LM collator gives labels (−100 on the prompt) but no instruction mask: the
    # generators must read the prompt, never the answer they are trained to predict.
    model = tiny_model("llama", "sdpa")
    wrapped = get_iapt_model(model, IAPTConfig(bottleneck_dim=8, init_std_up=0.5), seed=2, backend="torch")
    ids, mask, _ = padded_batch(3, 9, "left", seed=23)
    labels = ids.masked_fill(mask == 0, -100)
    prompt = mask.clone()
    for b in range(3):
        real = torch.nonzero(mask[b]).flatten()
        labels[b, real[:-3]] = -100  # the last 3 real tokens are the answer
        prompt[b, real[-3:]] = 0
    derived = wrapped(input_ids=ids, attention_mask=mask, labels=labels)
    explicit = wrapped(input_ids=ids, attention_mask=mask, labels=labels, instruction_mask=prompt)
    leaked = wrapped(input_ids=ids, attention_mask=mask, labels=labels, instruction_mask=mask)
    torch.testing.assert_close(derived.loss, explicit.loss, rtol=0, atol=0)
    assert (derived.loss - leaked.loss).abs() > 1e-4  # the answer really would change the prefix
    with pytest.raises(ValueError, match="labelled from their first token on"):
        wrapped(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    with pytest.raises(ValueError, match="labels must be a"):
        wrapped(input_ids=ids, attention_mask=mask, labels=labels[:, :4])


def test_a_detached_model_refuses_to_run():
    model = tiny_model("llama", "sdpa")
    wrapped = get_iapt_model(model, IAPTConfig(bottleneck_dim=8), backend="torch")
    ids = torch.randint(3, 50, (1, 5))
    assert wrapped.remove_hooks() is model
    with pytest.raises(RuntimeError, match="detached from its backbone"):
        wrapped(input_ids=ids)
    with pytest.raises(RuntimeError, match="detached from its backbone"):
        wrapped.generate(ids, max_new_tokens=2)
    get_iapt_model(model, IAPTConfig(bottleneck_dim=8))(input_ids=ids)  # the backbone wraps again

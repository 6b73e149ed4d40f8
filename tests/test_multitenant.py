"""Many IAPT adapters on one frozen backbone, a different adapter per row."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from iapt_fast import IAPTConfig, IAPTModel, get_iapt_model
from iapt_fast.generator import functional
from slow_reference import padded_batch, slow_logits, tiny_model

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(**overrides) -> IAPTConfig:
    base = dict(bottleneck_dim=8, init_std_up=0.5)
    base.update(overrides)
    return IAPTConfig(**base)


def tenants(family="llama", attn="sdpa", extra: dict | None = None) -> IAPTModel:
    """A wrapped model with adapters a, b (m = 8), c (m = 8, pooling the raw hidden states: a
    second group) and wide (m = 12: a third)."""
    wrapped = get_iapt_model(tiny_model(family, attn), cfg(), adapter_name="a", seed=1, backend="torch")
    wrapped.add_adapter("b", cfg(), seed=2)
    wrapped.add_adapter("c", cfg(rational_init="tanh", pool_input="hidden"), seed=3)
    wrapped.add_adapter("wide", cfg(bottleneck_dim=12), seed=4)
    for name, config in (extra or {}).items():
        wrapped.add_adapter(name, config, seed=len(wrapped.adapter_names) + 1)
    return wrapped


def strip(ids, mask, row):
    keep = mask[row].bool()
    return ids[row][keep][None], torch.ones(1, int(keep.sum()), dtype=torch.long)


class CallCounter:
    def __init__(self, monkeypatch):
        self.calls, self.batches = 0, []
        original = functional.prompt_generator

        def counted(hidden, *args, **kwargs):
            self.calls += 1
            self.batches.append(hidden.shape[0])
            return original(hidden, *args, **kwargs)

        monkeypatch.setattr(functional, "prompt_generator", counted)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_mixed_batch_rows_equal_single_adapter_runs(family, monkeypatch):
    wrapped = tenants(family)
    names = ["b", "wide", "a", "__base__", "c", "b"]
    ids, mask, _ = padded_batch(len(names), 9, "left", seed=41)
    counter = CallCounter(monkeypatch)
    with torch.no_grad():
        mixed = wrapped(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    # one launch per layer per shape group: {a, b, c} share shapes (c pools the normed input,
    # which is its own group), wide has m = 12
    groups = 3
    assert counter.calls == 2 * groups
    tokens = wrapped.generate(ids, attention_mask=mask, adapter_names=names, max_new_tokens=5, min_new_tokens=5,
                              do_sample=False, pad_token_id=0)
    base = wrapped.base_model
    for row, name in enumerate(names):
        one_ids, one_mask = strip(ids, mask, row)
        with torch.no_grad():
            if name == "__base__":
                alone = base(input_ids=one_ids, attention_mask=one_mask).logits
            else:
                alone = wrapped(input_ids=one_ids, attention_mask=one_mask, adapter_names=[name]).logits
        got = mixed[row][mask[row].bool()]
        assert (got - alone[0]).abs().max().item() <= TOL, f"row {row} ({name})"
        if name != "__base__":  # ... and the single run is right (not just consistent)
            adapter = wrapped.generators[name]
            with torch.no_grad():
                ref = slow_logits(base, {l: adapter[l].weights() for l in adapter.layer_indices}, one_ids, one_mask,
                                  one_mask, pool_input=adapter.config.pool_input)
            assert (alone - ref).abs().max().item() <= TOL, f"row {row} ({name}) vs the slow reference"
        if name == "__base__":
            single = base.generate(one_ids, attention_mask=one_mask, max_new_tokens=5, min_new_tokens=5,
                                   do_sample=False, pad_token_id=0)
        else:
            wrapped.set_adapter(name)
            single = wrapped.generate(one_ids, attention_mask=one_mask, max_new_tokens=5, min_new_tokens=5,
                                      do_sample=False, pad_token_id=0)
        assert torch.equal(tokens[row, -5:], single[0, -5:]), f"row {row} ({name}) greedy tokens differ"


def test_mixed_batch_matches_the_slow_reference_per_row():
    wrapped = tenants("qwen2", "eager")
    names = ["a", "b", "a", "b"]
    ids, mask, inst = padded_batch(4, 8, "left", seed=43)
    with torch.no_grad():
        mixed = wrapped(input_ids=ids, attention_mask=mask, instruction_mask=inst, adapter_names=names).logits
        per_row = {layer: {w: torch.cat([wrapped.generator_weights(layer, n)[w] for n in names]) for w in
                           ("w_down", "w_pool", "rat_num", "rat_den", "w_up", "anchor", "anchor_scale")}
                   for layer in range(2)}
        ref = slow_logits(wrapped.base_model, per_row, ids, mask, inst)
    assert (mixed - ref)[mask.bool()].abs().max().item() <= TOL


def test_mixed_beam_search_rows_equal_single_runs():
    wrapped = tenants("llama")
    names = ["c", "a", "wide"]
    ids, mask, _ = padded_batch(3, 7, "left", seed=47)
    kw = dict(num_beams=3, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    mixed = wrapped.generate(ids, attention_mask=mask, adapter_names=names, **kw)
    for row, name in enumerate(names):
        one_ids, one_mask = strip(ids, mask, row)
        single = wrapped.generate(one_ids, attention_mask=one_mask, adapter_names=[name], **kw)
        assert torch.equal(mixed[row, -4:], single[0, -4:]), f"row {row} ({name})"


def test_64_rows_64_adapters_one_launch_per_layer(monkeypatch):
    model = tiny_model("llama", "sdpa")
    wrapped = get_iapt_model(model, cfg(), adapter_name="t0", seed=0, backend="torch")
    for i in range(1, 64):
        wrapped.add_adapter(f"t{i}", cfg(), seed=i)
    names = [f"t{i}" for i in torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()]
    ids, mask, _ = padded_batch(64, 6, "left", seed=53)
    counter = CallCounter(monkeypatch)
    with torch.no_grad():
        mixed = wrapped(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    assert counter.calls == 2 and counter.batches == [64, 64]
    for row in (0, 17, 63):  # spot checks against single-adapter runs
        with torch.no_grad():
            alone = wrapped(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1],
                            adapter_names=[names[row]]).logits
        assert (mixed[row] - alone[0])[mask[row].bool()].abs().max().item() <= TOL
    tokens = wrapped.generate(ids, attention_mask=mask, adapter_names=names, max_new_tokens=3, pad_token_id=0)
    assert tokens.shape == (64, 9)


def test_1000_adapters_loaded_memory_and_load_time(tmp_path, capsys):
    model = tiny_model("llama", "sdpa")
    wrapped = get_iapt_model(model, cfg(), adapter_name="seed0", seed=0, backend="torch")
    wrapped.save_pretrained(tmp_path / "saved")
    backbone_ptrs = {p.data_ptr() for p in model.parameters()}
    start = time.perf_counter()
    for i in range(1, 1000):
        wrapped.load_adapter(tmp_path / "saved", f"t{i}")
    load_ms = (time.perf_counter() - start) * 1000 / 999
    assert len(wrapped.adapter_names) == 1000
    assert {p.data_ptr() for p in model.parameters()} == backbone_ptrs  # the backbone is never copied
    per_adapter = sum(p.numel() * p.element_size() for p in wrapped.generators["t1"].parameters())
    names = [f"t{i}" for i in range(1, 1000, 16)]  # 63 distinct adapters in one batch
    ids, mask, _ = padded_batch(len(names), 5, "left", seed=59)
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        ref = wrapped(input_ids=ids, attention_mask=mask, adapter_names=["seed0"] * len(names)).logits
    assert torch.equal(out, ref)  # every loaded copy is bit-identical to the saved adapter
    # After packing, every adapter's parameters alias one stack per layer: no second copy.
    storages = {p.untyped_storage().data_ptr() for n in wrapped.adapter_names
                for p in wrapped.generators[n].parameters()}
    assert len(storages) == 2 * 6  # 2 layers × (5 weights + the anchor)
    with capsys.disabled():
        print(f"\n[multitenant] 1000 adapters: {per_adapter} B each, {per_adapter * 1000 / 2**20:.2f} MiB in all, "
              f"load {load_ms:.2f} ms/adapter (d=32, m=8, 2 layers)")
    assert load_ms < 50


def test_packed_serving_sees_training_updates_and_deletes():
    wrapped = tenants("llama")
    ids, mask, _ = padded_batch(2, 6, "left", seed=61)
    with torch.no_grad():
        before = wrapped(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"]).logits
    wrapped.set_adapter("b")
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=1.0)
    loss = wrapped(input_ids=ids, attention_mask=mask, adapter_names=["b", "b"]).logits.square().mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = wrapped(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"]).logits
        fresh_b = wrapped(input_ids=ids[1:], attention_mask=mask[1:], adapter_names=["b"]).logits
    assert torch.equal(after[0], before[0])  # a untouched
    assert (after[1] - before[1]).abs().max() > 1e-3  # b's update is served
    torch.testing.assert_close(after[1:], fresh_b, rtol=0, atol=TOL)
    wrapped.delete_adapter("a")
    assert wrapped.adapter_names == ["b", "c", "wide"]
    with torch.no_grad():
        again = wrapped(input_ids=ids, attention_mask=mask, adapter_names=["b", "b"]).logits
    torch.testing.assert_close(again[1], after[1], rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="unknown adapter 'a'"):
        wrapped(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"])


def test_adapter_management_api(tmp_path):
    wrapped = tenants("gpt2")
    assert wrapped.adapter_names == ["a", "b", "c", "wide"] and wrapped.active_adapter == "a"
    wrapped.set_adapter("wide")
    assert [n for n, p in wrapped.named_parameters() if p.requires_grad] and all(
        n.startswith("generators.adapters.wide.") for n, p in wrapped.named_parameters() if p.requires_grad)
    wrapped.add_adapter("copy")  # config of the active adapter
    assert wrapped.peft_config["copy"].bottleneck_dim == 12
    wrapped.save_pretrained(tmp_path / "wide", adapter_name="wide")
    wrapped.load_adapter(tmp_path / "wide", "wide2")
    for layer in range(2):
        a, b = wrapped.generator_weights(layer, "wide"), wrapped.generator_weights(layer, "wide2")
        assert all(torch.equal(a[k], b[k]) for k in a)
    wrapped.delete_adapter("wide")
    assert wrapped.active_adapter == "a"


# ------------------------------------------------------------------------------ errors
def test_bad_adapter_input_leaves_loaded_adapters_untouched(tmp_path, monkeypatch):
    wrapped = tenants("llama")
    wrapped.add_adapter("t5", cfg(num_soft_tokens=5))
    wrapped.add_adapter("l0", cfg(target_layers=[0]))
    ids, mask, _ = padded_batch(2, 6, "left", seed=67)
    snapshot = {k: v.clone() for k, v in wrapped.generators.state_dict().items()}
    names_before = list(wrapped.adapter_names)
    counter = CallCounter(monkeypatch)
    with pytest.raises(ValueError, match="unknown adapter 'zzz'.*loaded adapters"):
        wrapped(input_ids=ids, attention_mask=mask, adapter_names=["a", "zzz"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 2 rows"):
        wrapped.generate(ids, attention_mask=mask, adapter_names=["a", "b", "c"], max_new_tokens=2)
    with pytest.raises(TypeError, match="adapter_names must be a list"):
        wrapped(input_ids=ids, attention_mask=mask, adapter_names="a")
    with pytest.raises(ValueError, match="must share target_layers and num_soft_tokens"):
        wrapped(input_ids=ids, attention_mask=mask, adapter_names=["a", "t5"])
    with pytest.raises(ValueError, match="must share target_layers and num_soft_tokens"):
        wrapped(input_ids=ids, attention_mask=mask, adapter_names=["l0", "a"])
    with pytest.raises(ValueError, match="already loaded"):
        wrapped.add_adapter("a", cfg())
    with pytest.raises(ValueError, match="reserved"):
        wrapped.add_adapter("__base__", cfg())
    with pytest.raises(ValueError, match="unknown adapter"):
        wrapped.set_adapter("nope")
    with pytest.raises(ValueError, match="unknown adapter"):
        wrapped.delete_adapter("nope")

    # corrupt / missing / incompatible adapter files
    good = tmp_path / "good"
    wrapped.save_pretrained(good, adapter_name="b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        wrapped.load_adapter(tmp_path / "missing", "x")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        wrapped.load_adapter(no_weights, "x")
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{not json")
    (bad_json / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="not valid JSON"):
        wrapped.load_adapter(bad_json, "x")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (truncated / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        wrapped.load_adapter(truncated, "x")
    other = tmp_path / "other_backbone"  # trained on hidden size 64
    get_iapt_model(tiny_model("llama", hidden=64), cfg(), backend="torch").save_pretrained(other)
    with pytest.raises(ValueError, match=r"made on a llama \(hidden size 64, 2 layers\), this backbone is a llama "
                                         r"\(hidden size 32, 2 layers\) \(different hidden_size\)"):
        wrapped.load_adapter(other, "x")
    with pytest.raises(ValueError, match="expected .* for hidden size 32"):  # no override fits other shapes
        wrapped.load_adapter(other, "x", allow_other_backbone=True)
    deep = tmp_path / "deep"  # targets a layer this backbone does not have
    get_iapt_model(tiny_model("llama", layers=4), cfg(target_layers=[3]), backend="torch").save_pretrained(deep)
    with pytest.raises(ValueError, match="different num_layers.*allow_other_backbone=True"):
        wrapped.load_adapter(deep, "x")
    with pytest.raises(ValueError, match="does not fit this backbone.*out of range"):
        wrapped.load_adapter(deep, "x", allow_other_backbone=True)
    mismatch = tmp_path / "mismatch"  # config says m = 16, weights have m = 8
    mismatch.mkdir()
    data = json.loads((good / "adapter_config.json").read_text())
    data["bottleneck_dim"] = 16
    (mismatch / "adapter_config.json").write_text(json.dumps(data))
    (mismatch / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="has shape"):
        wrapped.load_adapter(mismatch, "x")

    assert wrapped.adapter_names == names_before
    after = wrapped.generators.state_dict()
    assert set(after) == set(snapshot) and all(torch.equal(after[k], snapshot[k]) for k in snapshot)
    assert counter.calls == 0
    with torch.no_grad():  # still serving
        wrapped(input_ids=ids, attention_mask=mask, adapter_names=["a", "wide"])
    assert os.path.isdir(good)


def test_serving_under_inference_mode_then_training():
    wrapped = tenants("llama")
    ids, mask, _ = padded_batch(2, 6, "left", seed=89)
    with torch.inference_mode():  # builds the serving packs
        wrapped.generate(ids, attention_mask=mask, adapter_names=["a", "b"], max_new_tokens=2, pad_token_id=0)
    opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    wrapped(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
    opt.step()  # in place on parameters that alias the packs
    with torch.no_grad():
        served = wrapped(input_ids=ids, attention_mask=mask, adapter_names=["a", "a"]).logits
        wrapped.backend = "torch"
    assert torch.isfinite(served).all()
    # PEFT-style attribute forwarding to the wrapped model
    assert wrapped.generation_config is wrapped.base_model.generation_config
    assert wrapped.dtype == torch.float32


def _scale_in_place(wrapped):
    with torch.no_grad():
        for p in wrapped.generators["b"].parameters():
            p.mul_(1.5)


def _replace_storage(wrapped):
    with torch.no_grad():
        for p in wrapped.generators["b"].parameters():  # b shares its pack with a
            p.data = p.data * 0.5 + 0.01


def _load_state_dict_assign(wrapped):
    state = {k: v.clone() * 0.75 for k, v in wrapped.generators["wide"].state_dict().items()}
    wrapped.generators["wide"].load_state_dict(state, assign=True)


def _there_and_back(wrapped):
    wrapped.generators.to(torch.float64)
    wrapped.generators.to(torch.float32)


CHANGES = {
    "bank to bfloat16": lambda w: w.generators.to(torch.bfloat16),
    "bank to float64": lambda w: w.generators.to(torch.float64),
    "float64 and back": _there_and_back,
    "model .double()": lambda w: w.double(),
    "one adapter to bfloat16": lambda w: w.generators["b"].to(torch.bfloat16),
    "one layer to float64": lambda w: w.generators["c"][1].to(torch.float64),
    "in-place update": _scale_in_place,
    "param.data replaced": _replace_storage,
    "load_state_dict(assign=True)": _load_state_dict_assign,
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_serving_after_a_move_or_weight_change_equals_a_fresh_model(change):
    """Whatever happens to the generators' tensors between served calls, the next call is served
    what a model that had them so from the start serves: no stale stack, no stale group key."""
    ids, mask, inst = padded_batch(4, 7, "left", seed=97)
    rows = ["a", "b", "c", "wide"]

    def serve(wrapped):
        with torch.no_grad():
            return wrapped(input_ids=ids.clone(), attention_mask=mask, instruction_mask=inst,
                           adapter_names=rows).logits

    served = tenants("llama")
    before = serve(served)  # builds the packs
    CHANGES[change](served)
    after, again = serve(served), serve(served)
    fresh = tenants("llama")
    CHANGES[change](fresh)
    want = serve(fresh)
    # float64 weights are computed in float32 (the same values): there the stale pack, not the
    # output, would be the failure (a KeyError of the planner).
    assert torch.equal(want, before) == ("float64" in change)
    assert torch.equal(after, want), (after - want).abs().max()
    assert torch.equal(again, want)

"""Property tests over the public entry points: for every generated input, either a
ValueError / TypeError that names what is wrong, or a finite result equal to the reference;
and no failed call changes any loaded adapter.

Covered: ``prompt_generator`` (both backends), ``IAPTConfig``, ``IAPTModel.forward`` /
``generate`` on a tiny Llama with several adapters, and ``load_adapter`` on mutated files.
Inputs are drawn by hypothesis (so a failure shrinks to a minimal case and replays).
"""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from iapt_fast import IAPTConfig, get_iapt_model
from iapt_fast.generator import functional
from iapt_fast.generator import reference
from iapt_fast.generator.weights import GeneratorWeights
from iapt_fast.model.adapter_io import WEIGHTS_NAME
from slow_reference import VOCAB, slow_logits, tiny_model

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("IAPT_HYPOTHESIS_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
ERRORS = (ValueError, TypeError)


def _names_something(err: Exception, words) -> bool:
    text = str(err)
    return any(w in text for w in words)


# ============================================================================ prompt_generator
GEN_ARGS = ("hidden", "mask", "w_down", "w_pool", "rat_num", "rat_den", "w_up", "adapter_ids", "anchor",
            "anchor_scale", "rational_version", "backend")
MUTATIONS = ("none", "hidden_2d", "hidden_int", "mask_float", "mask_shape", "weight_shape", "weight_dtype",
             "ids_range", "ids_shape", "ids_float", "ids_missing", "masked_nan", "anchor_shape", "scale_dtype",
             "not_tensor", "version", "empty_seq")


@SETTINGS
@given(batch=st.integers(1, 3), seq=st.integers(1, 9), dim=st.integers(1, 12), m=st.integers(1, 6),
       tokens=st.integers(1, 5), adapters=st.integers(1, 3), anchored=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), mutation=st.sampled_from(MUTATIONS),
       backend=st.sampled_from(["torch", "triton"] if functional.triton_available() else ["torch"]),
       seed=st.integers(0, 2**31 - 1))
def test_prompt_generator_errors_or_matches_the_float64_reference(batch, seq, dim, m, tokens, adapters, anchored,
                                                                   dtype, mutation, backend, seed):
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        hidden=torch.randn(batch, seq, dim, generator=g).to(dtype),
        mask=torch.rand(batch, seq, generator=g) < 0.7,
        w_down=torch.randn(adapters, dim, m, generator=g) / max(1, dim) ** 0.5,
        w_pool=torch.randn(adapters, m, tokens, generator=g),
        rat_num=torch.randn(adapters, 4, generator=g) * 0.3,
        rat_den=torch.randn(adapters, 3, generator=g) * 0.3,
        w_up=torch.randn(adapters, m, dim, generator=g) / max(1, m) ** 0.5,
        adapter_ids=torch.randint(0, adapters, (batch,), generator=g) if adapters > 1 else None,
        backend=backend,
    )
    if anchored:
        kw["anchor"] = torch.randn(adapters, tokens, dim, generator=g)
        kw["anchor_scale"] = torch.rand(adapters, generator=g) + 0.5
    if mutation == "hidden_2d":
        kw["hidden"] = kw["hidden"][0]
    elif mutation == "hidden_int":
        kw["hidden"] = kw["hidden"].long()
    elif mutation == "mask_float":
        kw["mask"] = kw["mask"].float()
    elif mutation == "mask_shape":
        kw["mask"] = kw["mask"][:, :-1] if seq > 1 else kw["mask"][:0]
    elif mutation == "weight_shape":
        kw["w_up"] = kw["w_up"][..., :-1] if dim > 1 else kw["w_up"][:, :0]
    elif mutation == "weight_dtype":
        kw["w_pool"] = kw["w_pool"].half()
    elif mutation == "ids_range" and adapters > 1:
        kw["adapter_ids"] = kw["adapter_ids"] + adapters
    elif mutation == "ids_shape" and adapters > 1:
        kw["adapter_ids"] = kw["adapter_ids"][None]
    elif mutation == "ids_float" and adapters > 1:
        kw["adapter_ids"] = kw["adapter_ids"].float()
    elif mutation == "ids_missing" and adapters > 1:
        kw["adapter_ids"] = None
    elif mutation == "masked_nan":
        kw["hidden"] = kw["hidden"].masked_fill(~kw["mask"][..., None], float("nan"))
    elif mutation == "anchor_shape" and anchored:
        kw["anchor"] = kw["anchor"][:, :, :0]
    elif mutation == "scale_dtype" and anchored:
        kw["anchor_scale"] = kw["anchor_scale"].double()
    elif mutation == "not_tensor":
        kw["rat_den"] = kw["rat_den"].tolist()
    elif mutation == "version":
        kw["rational_version"] = "C"
    elif mutation == "empty_seq":
        kw["hidden"], kw["mask"] = kw["hidden"][:, :0], kw["mask"][:, :0]
    try:
        out = functional.prompt_generator(**kw)
    except ERRORS as err:
        assert _names_something(err, GEN_ARGS), f"{mutation}: the error names no argument: {err}"
        event("rejected")
        return
    event("compared with the reference")
    assert torch.isfinite(out).all(), mutation
    ref_kw = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in kw.items() if k not in ("backend",)}
    weights = GeneratorWeights(**{k: ref_kw.pop(k) for k in GeneratorWeights._fields if k in ref_kw})
    ref = reference.prompt_generator(ref_kw["hidden"], ref_kw["mask"], weights, ref_kw.get("adapter_ids"),
                                     ref_kw.get("rational_version", "B"))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * (1 + float(ref.abs().max())))


# ============================================================================ IAPTConfig
def _field_values():
    plausible = st.sampled_from([4, 8, 2, "normed", "hidden", "anchored", "paper", (6, 5), (3, 2), (-3.0, 3.0), "gelu",
                                 "tanh", "A", "B", [0], [0, -1], 0.02, 0.5, True, False, "bos", "text", "hello"])
    junk = st.one_of(plausible, plausible, st.none(), st.booleans(), st.integers(-3, 20), st.text(max_size=5),
                     st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(-3, 5), max_size=3),
                     st.tuples(st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True, allow_infinity=True)))
    return st.dictionaries(st.sampled_from([
        "num_soft_tokens", "bottleneck_dim", "rational_degrees", "rational_version", "rational_init",
        "rational_fit_interval", "target_layers", "pool_input", "init_std_up", "generator_form", "anchor_init",
        "prompt_init_text", "anchor_scaled", "base_model_name_or_path"]), junk, max_size=4)


@SETTINGS
@given(fields=_field_values())
def test_iapt_config_errors_name_the_field_or_round_trip(fields):
    try:
        cfg = IAPTConfig(**fields)
    except ERRORS as err:
        assert _names_something(err, list(fields)), f"{fields}: {err}"
        event("rejected: " + str(err)[:30])
        return
    event("valid")
    for value in vars(cfg).values():  # nothing non-finite survives validation
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            assert not (isinstance(v, float) and not math.isfinite(v)), fields
    again = IAPTConfig.from_json_string(cfg.to_json_string())
    assert again.to_dict() == cfg.to_dict()


# ============================================================================ IAPTModel
@pytest.fixture(scope="module")
def host():
    model = get_iapt_model(tiny_model("llama", layers=2), IAPTConfig(bottleneck_dim=8, init_std_up=0.5),
                           adapter_name="A", seed=1, backend="torch")
    model.add_adapter("B", IAPTConfig(bottleneck_dim=8, init_std_up=0.5), seed=2)
    model.add_adapter("L0", IAPTConfig(bottleneck_dim=8, init_std_up=0.5, target_layers=[0]), seed=3)
    model.add_adapter("T3", IAPTConfig(bottleneck_dim=8, init_std_up=0.5, num_soft_tokens=3), seed=4)
    return model


def _bank(model):
    return {k: v.clone() for k, v in model.generators.state_dict().items()}


def _same_bank(model, before) -> bool:
    after = model.generators.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


MODEL_WORDS = ("input_ids", "attention_mask", "instruction_mask", "labels", "adapter_names", "adapter", "rows",
               "inputs_embeds", "batch")


@SETTINGS
@given(batch=st.sampled_from([1, 2, 3, 3, 2, 0]), length=st.sampled_from([1, 3, 5, 6, 6, 0]),
       side=st.sampled_from(["left", "right", "none"]),
       rows=st.lists(st.sampled_from(["A", "B", "A", "B", "__base__", None, "L0", "T3", "zzz", 5]), min_size=0,
                     max_size=4),
       fit_rows=st.sampled_from([True, True, True, False]), default_rows=st.sampled_from([False, False, True]), inst_kind=st.sampled_from(["none", "prompt", "prompt", "random", "padding", "empty"]),
       with_labels=st.booleans(), call=st.sampled_from(["forward", "generate"]), ids_dims=st.sampled_from([2, 2, 2, 1]),
       seed=st.integers(0, 2**31 - 1))
def test_model_calls_error_clearly_or_match_the_slow_reference(host, batch, length, side, rows, fit_rows, default_rows,
                                                               inst_kind, with_labels, call, ids_dims, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        pad = int(torch.randint(0, max(1, length), (1,), generator=g)) if side != "none" else 0
        if pad:
            mask[b, :pad] = 0 if side == "left" else 1
            if side == "right":
                mask[b, length - pad:] = 0
    inst = {"none": None, "prompt": mask.clone(),
            "random": mask * (torch.rand(batch, length, generator=g) < 0.6).long(),
            "padding": torch.ones_like(mask), "empty": torch.zeros_like(mask)}[inst_kind]
    labels = None
    if with_labels:
        labels = ids.masked_fill(torch.rand(batch, length, generator=g) < 0.5, -100)
    if fit_rows:  # one name per row (the usual case); otherwise the list's own length
        rows = (rows + ["A"] * batch)[:batch]
    names = None if default_rows else rows
    args = dict(attention_mask=mask, instruction_mask=inst, adapter_names=names)
    inputs = ids if ids_dims == 2 else ids.flatten()
    before = _bank(host)
    try:
        with torch.no_grad():
            if call == "forward":
                out = host(input_ids=inputs, labels=labels, **args).logits
            else:
                out = host.generate(inputs, max_new_tokens=2, do_sample=False, pad_token_id=0, **args)
    except ERRORS as err:
        assert _names_something(err, MODEL_WORDS), f"the error names nothing: {err}"
        assert _same_bank(host, before)
        event("rejected: " + str(err)[:40])
        return
    event(f"{call} ran")
    assert _same_bank(host, before)
    if call == "generate":
        assert out.shape[0] == batch and out.shape[1] >= length
        return
    assert torch.isfinite(out).all()
    # The oracle: literal prepending, each row with its own adapter (base rows: none).
    used = [r if r not in (None, "__base__") else None for r in (names or ["A"] * batch)]
    first = next(r for r in used if r is not None) if any(used) else "A"
    layers = host.generators[first].layer_indices
    weights = {layer: {w: torch.cat([host.generators[r or first][layer].weights()[w] for r in used])
                       for w in host.generators[first][layer].names} for layer in layers}
    if inst is None:
        from iapt_fast.model.call_state import prompt_before_labels
        inst = prompt_before_labels(labels, mask) if labels is not None else mask
    ref = slow_logits(host.base_model, weights, ids, mask, inst,
                      prefix_rows=torch.tensor([r is not None for r in used]))
    real = mask.bool()
    assert (out - ref)[real].abs().max().item() <= 1e-4


# ============================================================================ load_adapter
FILE_MUTATIONS = ("none", "drop_field", "bad_field", "bad_json", "latin1", "drop_tensor", "extra_tensor", "reshape",
                  "one_half", "all_half", "nan", "truncate", "int_tensor", "no_weights", "no_config")


@SETTINGS
@given(mutation=st.sampled_from(FILE_MUTATIONS), field=st.sampled_from(
    ["num_soft_tokens", "bottleneck_dim", "rational_degrees", "target_layers", "init_std_up", "generator_form",
     "pool_input", "peft_type", "backbone"]), value=st.one_of(st.integers(-2, 40), st.floats(allow_nan=False), st.text(max_size=4),
                                                   st.none(), st.lists(st.integers(-3, 3), max_size=3)),
       pick=st.integers(0, 10_000), cut=st.floats(0.0, 0.99))
def test_load_adapter_on_mutated_files_loads_or_names_the_problem(host, tmp_path_factory, mutation, field, value, pick,
                                                                  cut):
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("adapter")
    good = root / "good"
    host.save_pretrained(good, adapter_name="B")
    path = root / "mutated"
    shutil.copytree(good, path)
    config_file, weights_file = path / "adapter_config.json", path / WEIGHTS_NAME
    data = json.loads(config_file.read_text())
    tensors = load_file(str(weights_file))
    key = sorted(tensors)[pick % len(tensors)]
    if mutation == "drop_field":
        data.pop(field, None)
    elif mutation == "bad_field":
        data[field] = value
    if mutation in ("drop_field", "bad_field"):
        config_file.write_text(json.dumps(data))
    elif mutation == "bad_json":
        config_file.write_text(config_file.read_text()[: int(cut * len(config_file.read_text()))])
    elif mutation == "latin1":
        config_file.write_bytes(b'{"prompt_init_text": "caf\xe9"}')
    elif mutation == "truncate":
        weights_file.write_bytes(weights_file.read_bytes()[: int(cut * weights_file.stat().st_size)])
    elif mutation == "no_weights":
        weights_file.unlink()
    elif mutation == "no_config":
        config_file.unlink()
    elif mutation != "none":
        if mutation == "drop_tensor":
            tensors.pop(key)
        elif mutation == "extra_tensor":
            tensors["layers.9.w_down"] = torch.zeros(2, 2)
        elif mutation == "reshape":
            tensors[key] = tensors[key].flatten()[:-1] if tensors[key].numel() > 1 else torch.zeros(2)
        elif mutation == "one_half":
            tensors[key] = tensors[key].half()
        elif mutation == "all_half":
            tensors = {k: v.half() for k, v in tensors.items()}
        elif mutation == "nan":
            tensors[key] = tensors[key].clone().fill_(float("nan"))
        elif mutation == "int_tensor":
            tensors[key] = tensors[key].long()
        save_file(tensors, str(weights_file))
    before, names = _bank(host), list(host.adapter_names)
    try:
        host.load_adapter(path, "probe")
    except (ValueError, TypeError, FileNotFoundError) as err:
        assert "mutated" in str(err) or _names_something(err, [field, "adapter_config", WEIGHTS_NAME]), str(err)
        assert host.adapter_names == names and _same_bank(host, before)
        event("rejected")
        return
    event("loaded")
    try:
        assert host.adapter_names == names + ["probe"]
        ids = torch.randint(3, VOCAB, (2, 5))
        with torch.no_grad():
            out = host(input_ids=ids, adapter_names=["probe", "probe"]).logits
        assert torch.isfinite(out).all()
    finally:
        host.delete_adapter("probe")
    assert _same_bank(host, before)

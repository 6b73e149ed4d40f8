"""Adapter files: atomic saves (fault injection), dtype checks at load, clear errors on bad files."""
from __future__ import annotations

import json
import os

import pytest
import torch

from iapt_fast import IAPTConfig, IAPTModel, get_iapt_model
from iapt_fast.model.adapter_io import WEIGHTS_NAME
from iapt_fast.atomic import atomic_directory
from slow_reference import padded_batch, tiny_model


def _model(seed=1, **overrides):
    cfg = dict(bottleneck_dim=8, init_std_up=0.5)
    cfg.update(overrides)
    return get_iapt_model(tiny_model("llama"), IAPTConfig(**cfg), seed=seed, backend="torch")


def _logits(wrapped):
    ids, mask, _ = padded_batch(2, 6, "left", seed=5)
    with torch.no_grad():
        return wrapped(input_ids=ids, attention_mask=mask).logits


def _failing_save_file(monkeypatch):
    """safetensors' writer that dies half-way through the weights file."""
    import safetensors.torch as st

    real = st.save_file

    def torn(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(st, "save_file", torn)


@pytest.mark.parametrize("layout", ["adapter_folder", "run_folder"])
def test_failed_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch, layout):
    target = tmp_path / "adapter"
    old = _model(seed=1)
    old.save_pretrained(target)
    if layout == "run_folder":  # the CLI's output folder: checkpoints and metrics next to the adapter
        (target / "checkpoint-1").mkdir()
        (target / "checkpoint-1" / "keep.txt").write_text("mine")
        (target / "metrics.json").write_text("{}")
    before = sorted(os.listdir(target))
    new = _model(seed=2, num_soft_tokens=3, bottleneck_dim=12)  # another shape: a mix could not load
    _failing_save_file(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        new.save_pretrained(target)
    monkeypatch.undo()
    assert sorted(os.listdir(target)) == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary folders left behind
    loaded = IAPTModel.from_pretrained(tiny_model("llama"), target, backend="torch")
    torch.testing.assert_close(_logits(loaded), _logits(old), rtol=0, atol=0)
    # ... and a save that succeeds replaces both files together, keeping the run's other files
    new.save_pretrained(target)
    assert sorted(os.listdir(target)) == before
    loaded = IAPTModel.from_pretrained(tiny_model("llama"), target, backend="torch")
    torch.testing.assert_close(_logits(loaded), _logits(new), rtol=0, atol=0)
    if layout == "run_folder":
        assert (target / "checkpoint-1" / "keep.txt").read_text() == "mine"


def test_atomic_directory(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyError):
        with atomic_directory(target) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").write("f16")
            raise KeyError("crash mid-save")
    assert os.listdir(tmp_path) == ["ckpt"] and os.listdir(target) == ["old.txt"]
    with atomic_directory(target) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert os.listdir(tmp_path) == ["ckpt"] and os.listdir(target) == ["new.txt"]


def _rewrite(folder, change):
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, WEIGHTS_NAME)
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_mixed_dtype_file_is_refused_and_packing_never_changes_other_adapters(tmp_path):
    wrapped = _model(seed=1)
    wrapped.delete_adapter("default")
    src = _model(seed=3)
    half = tmp_path / "f16"
    src.save_pretrained(half)
    _rewrite(half, lambda t: t.update({k: v.half() for k, v in t.items()}))
    mixed = tmp_path / "mixed"
    src.save_pretrained(mixed)
    _rewrite(mixed, lambda t: t.update({"layers.0.w_up": t["layers.0.w_up"].half()}))

    with pytest.raises(ValueError, match="'half' cannot name an adapter"):
        wrapped.load_adapter(half, "half")
    wrapped.load_adapter(half, "f16")
    before = {k: (v.dtype, v.clone()) for k, v in wrapped.generators.state_dict().items()}
    with pytest.raises(ValueError, match=r"share one dtype.*float16.*float32.*layers\.0\.w_up is float16"):
        wrapped.load_adapter(mixed, "mixed")
    assert wrapped.adapter_names == ["f16"]
    ids, mask, _ = padded_batch(2, 6, "left", seed=9)
    with torch.no_grad():  # builds the serving packs
        wrapped(input_ids=ids, attention_mask=mask, adapter_names=["f16", "f16"])
    after = wrapped.generators.state_dict()
    assert all(after[k].dtype == d and torch.equal(after[k], v) for k, (d, v) in before.items())

    # An adapter whose tensors were made to disagree after loading can never join (and promote)
    # the pack of a consistent one: it fails alone, and the consistent one keeps its dtypes.
    wrapped.load_adapter(half, "f16b")
    with torch.no_grad():
        wrapped.generators["f16b"][0].w_up.data = wrapped.generators["f16b"][0].w_up.data.float()
        with pytest.raises(TypeError, match="share one dtype"):
            wrapped(input_ids=ids, attention_mask=mask, adapter_names=["f16", "f16b"])
        wrapped(input_ids=ids, attention_mask=mask, adapter_names=["f16", "f16"])
    assert all(p.dtype == torch.float16 for p in wrapped.generators["f16"].parameters())


def test_bad_config_files_name_the_file(tmp_path):
    wrapped = _model()
    good = tmp_path / "good"
    wrapped.save_pretrained(good)
    latin = tmp_path / "latin1"
    latin.mkdir()
    (latin / "adapter_config.json").write_bytes('{"base_model_name_or_path": "caf\xe9"}'.encode("latin-1"))
    (latin / WEIGHTS_NAME).write_bytes((good / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="latin1.*adapter_config.json.*not UTF-8"):
        wrapped.load_adapter(latin, "x")
    inf = tmp_path / "inf"
    inf.mkdir()
    data = json.loads((good / "adapter_config.json").read_text())
    (inf / "adapter_config.json").write_text(json.dumps(data).replace('"init_std_up": 0.5', '"init_std_up": Infinity'))
    (inf / WEIGHTS_NAME).write_bytes((good / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="adapter_config.json.*init_std_up must be a finite float"):
        wrapped.load_adapter(inf, "x")
    assert wrapped.adapter_names == ["default"]


def test_host_without_adapters_serves_the_first_loaded_one(tmp_path):
    trained = _model(seed=4)
    trained.save_pretrained(tmp_path / "a")
    host = IAPTModel(tiny_model("llama"), None, backend="torch")
    with pytest.raises(ValueError, match="no adapter is loaded"):
        _logits(host)
    host.load_adapter(tmp_path / "a", "a")
    assert host.active_adapter == "a"
    torch.testing.assert_close(_logits(host), _logits(trained), rtol=0, atol=0)


def test_folders_left_by_a_killed_rename_aside_writer_load_or_name_the_copy(tmp_path):
    """Plain folders (no commit record) load as they are; what a killed writer of the
    rename-aside kind leaves (``.name.old-*`` holding the adapter, ``.files.tmp-*`` stages) is
    named by the load error and removed by the next save."""
    import shutil

    old, new = _model(seed=1), _model(seed=2)
    target = tmp_path / "adapter"
    old.save_pretrained(target)
    aside = tmp_path / ".adapter.old-k1ll3d"
    shutil.move(target, aside)
    with pytest.raises(FileNotFoundError, match=r"moved the previous adapter to '.*\.adapter\.old-k1ll3d'"):
        IAPTModel.from_pretrained(tiny_model("llama"), target, backend="torch")
    shutil.copytree(aside, target)
    (target / ".files.tmp-k1ll3d").mkdir()
    (target / ".files.tmp-k1ll3d" / WEIGHTS_NAME).write_bytes(b"torn")
    loaded = IAPTModel.from_pretrained(tiny_model("llama"), target, backend="torch")
    torch.testing.assert_close(_logits(loaded), _logits(old), rtol=0, atol=0)
    new.save_pretrained(target)
    assert sorted(os.listdir(tmp_path)) == ["adapter"] and not any(e.startswith(".") for e in os.listdir(target))
    loaded = IAPTModel.from_pretrained(tiny_model("llama"), target, backend="torch")
    torch.testing.assert_close(_logits(loaded), _logits(new), rtol=0, atol=0)


def _weights(wrapped):
    return {layer: wrapped.generator_weights(layer) for layer in wrapped.generators[wrapped.active_adapter].layer_indices}


def test_an_adapter_made_on_another_backbone_is_refused_unless_allowed(tmp_path):
    import warnings

    gpt2 = get_iapt_model(tiny_model("gpt2"), IAPTConfig(bottleneck_dim=8, init_std_up=0.5), seed=1, backend="torch")
    gpt2.save_pretrained(tmp_path / "gpt2")
    record = json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())["backbone"]
    assert (record["model_type"], record["hidden_size"], record["num_layers"]) == ("gpt2", 32, 2)
    # Same hidden size and depth: the shapes fit, only the record tells the families apart.
    with pytest.raises(ValueError, match=r"made on a gpt2 .*hidden size 32, 2 layers.*this backbone is a llama"
                                         r".*different model_type.*allow_other_backbone=True"):
        IAPTModel.from_pretrained(tiny_model("llama"), tmp_path / "gpt2", backend="torch")
    deeper = tiny_model("gpt2", layers=3)
    with pytest.raises(ValueError, match="different num_layers"):
        IAPTModel.from_pretrained(deeper, tmp_path / "gpt2", backend="torch")
    host = IAPTModel(tiny_model("llama"), None, backend="torch")
    with pytest.raises(ValueError, match="made on a gpt2"):
        host.load_adapter(tmp_path / "gpt2", "g")
    assert host.adapter_names == []
    with pytest.raises(TypeError, match="allow_other_backbone must be a bool"):
        host.load_adapter(tmp_path / "gpt2", "g", allow_other_backbone="yes")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        host.load_adapter(tmp_path / "gpt2", "g", allow_other_backbone=True)
        same = IAPTModel.from_pretrained(tiny_model("gpt2"), tmp_path / "gpt2", backend="torch")  # its own: silent
    host.set_adapter("g")
    want = _weights(gpt2)
    for got in (_weights(host), _weights(same)):
        assert all(torch.equal(got[l][w], want[l][w]) for l in want for w in want[l])
    # The record stays the one the weights were made on, through a load with the override.
    host.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["backbone"] == record


def test_an_adapter_without_a_backbone_record_loads_with_a_warning(tmp_path):
    wrapped = _model(seed=3)
    wrapped.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    data = json.loads(path.read_text())
    del data["backbone"]
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="does not record the backbone.*llama"):
        old = IAPTModel.from_pretrained(tiny_model("llama"), tmp_path / "a", backend="torch")
    assert torch.equal(_logits(old), _logits(wrapped))
    old.save_pretrained(tmp_path / "b")  # saved again: recorded as the backbone it now runs on
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["backbone"]["model_type"] == "llama"
    for bad, message in (("llama", "backbone must be an object"),
                         ({"model_type": "llama", "hidden_size": "32", "num_layers": 2},
                          "backbone.hidden_size must be an integer")):
        path.write_text(json.dumps({**data, "backbone": bad}))
        with pytest.raises(ValueError, match=message):
            IAPTModel.from_pretrained(tiny_model("llama"), tmp_path / "a", backend="torch")

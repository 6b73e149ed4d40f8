"""IAPTConfig validation and JSON round trip."""
import json

import pytest
import torch

from iapt_fast import IAPTConfig


def test_defaults_and_round_trip(tmp_path):
    cfg = IAPTConfig(bottleneck_dim=32, target_layers=[0, -1], pool_input="normed", rational_version="A")
    assert cfg.num_soft_tokens == 4 and cfg.rational_degrees == (6, 5) and cfg.rational_init == "gelu"
    again = IAPTConfig.from_json_string(cfg.to_json_string())
    assert again == cfg
    cfg.save_pretrained(tmp_path)
    assert IAPTConfig.from_pretrained(tmp_path) == cfg
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "IAPT"


def test_resolved_values():
    assert IAPTConfig().resolved_bottleneck(4096) == 320
    assert IAPTConfig().resolved_bottleneck(64) == 8
    assert IAPTConfig(bottleneck_dim=12).resolved_bottleneck(4096) == 12
    assert IAPTConfig(target_layers=[-1, 0]).resolved_layers(4) == [0, 3]
    assert IAPTConfig().resolved_layers(3) == [0, 1, 2]
    with pytest.raises(ValueError, match="out of range"):
        IAPTConfig(target_layers=[4]).resolved_layers(4)
    with pytest.raises(ValueError, match="same layer twice"):
        IAPTConfig(target_layers=[3, -1]).resolved_layers(4)


def test_callable_init_serialises_as_custom():
    cfg = IAPTConfig(rational_init=lambda t: torch.sin(t))
    data = json.loads(cfg.to_json_string())
    assert data["rational_init"] == "custom"
    assert IAPTConfig.from_dict(data).rational_init == "custom"


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(num_soft_tokens=0), "num_soft_tokens"),
        (dict(num_soft_tokens=2.0), "num_soft_tokens"),
        (dict(bottleneck_dim=-3), "bottleneck_dim"),
        (dict(rational_degrees=(6,)), "rational_degrees"),
        (dict(rational_degrees=(6, 0)), "rational_degrees"),
        (dict(rational_version="C"), "rational_version"),
        (dict(rational_init="swish"), "rational_init"),
        (dict(rational_fit_interval=(3, -3)), "rational_fit_interval"),
        (dict(target_layers=[]), "target_layers"),
        (dict(target_layers=[1, 1]), "target_layers"),
        (dict(target_layers="0,1"), "target_layers"),
        (dict(pool_input="raw"), "pool_input"),
        (dict(init_std_up=0.0), "init_std_up"),
    ],
)
def test_invalid_fields(kwargs, words):
    with pytest.raises(ValueError, match=words):
        IAPTConfig(**kwargs)


def test_bad_json():
    with pytest.raises(ValueError, match="not valid JSON"):
        IAPTConfig.from_json_string("{")
    with pytest.raises(ValueError, match="unknown IAPTConfig fields"):
        IAPTConfig.from_dict({"num_soft_tokens": 4, "rank": 8})
    with pytest.raises(ValueError, match="peft_type"):
        IAPTConfig.from_dict({"peft_type": "LORA"})
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        IAPTConfig.from_pretrained("/nonexistent-dir")

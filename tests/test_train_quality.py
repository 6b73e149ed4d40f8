"""The quality report's pipeline on a tiny random model (--synthetic): no model or data packages.

Checks that every method trains through the shared loop and lands in the JSON/Markdown/PNG
outputs with consistent numbers; the real run is benchmarks/results/quality-*/.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def test_quick_synthetic_report(tmp_path):
    pytest.importorskip("peft")
    from benchmarks import quality

    before = torch.get_num_threads()
    try:
        args = quality.parse_args(["--quick", "--synthetic", "--steps", "3", "--n-test", "24", "--no-progress",
                                   "--methods", "zero_shot,prompt_tuning,lora,iapt_bilevel", "--out", str(tmp_path)])
        results = quality.run(args)
    finally:
        torch.set_num_threads(before)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["methods"]) == ["zero_shot", "prompt_tuning", "lora", "iapt_bilevel"]
    for name, entry in saved["methods"].items():
        t = entry["test"]
        assert t["n"] == 24 and t["correct"] == round(t["accuracy"] * 24)
        assert t["ci95"][0] <= t["accuracy"] <= t["ci95"][1]
        if name != "zero_shot":
            assert entry["steps"] == 3 and len(entry["curve"]) == 3 and entry["trainable_parameters"] > 0
    iapt = saved["methods"]["iapt_bilevel"]
    assert len(iapt["dev_curve"]) == 3 and iapt["rational_lr"] == 1e-6
    # LoRA's rank is chosen to match IAPT's parameter budget as closely as a whole rank allows.
    ratio = saved["methods"]["lora"]["trainable_parameters"] / iapt["trainable_parameters"]
    assert 0.5 < ratio < 1.5
    md = (tmp_path / "results.md").read_text()
    assert all(name in md for name in saved["methods"])
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert results["methods"].keys() == saved["methods"].keys()

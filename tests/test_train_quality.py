"""The quality report's pipeline on a tiny random model (--synthetic): no model or data packages.

Checks that every method trains through the shared loop, that the LR sweep is chosen on dev
and re-run at the second seed, that finished runs are reused, and that the JSON/Markdown/PNG
outputs hold consistent numbers; the real run is benchmarks/results/quality-*/.
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


def test_quick_synthetic_report(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from benchmarks import quality

    root, tmp_path = tmp_path, tmp_path / "rotten_tomatoes"
    methods = ["zero_shot", "prompt_tuning", "prefix_tuning", "lora", "iapt_paper", "iapt"]
    before = torch.get_num_threads()
    try:
        args = quality.parse_args(["--quick", "--synthetic", "--steps", "3", "--n-test", "24", "--no-progress",
                                   "--seeds", "0,1", "--tune", "--tune-factors", "1,3", "--methods",
                                   ",".join(methods[:4]), "--out", str(tmp_path)])
        quality.run(args)
        # A second process on the same --out (other methods) and fixed LRs: no sweep for them.
        args = quality.parse_args(["--quick", "--synthetic", "--steps", "3", "--n-test", "24", "--no-progress",
                                   "--seeds", "0,1", "--lrs", "iapt=0.002,iapt_paper=0.001", "--methods",
                                   "iapt_paper,iapt", "--out", str(tmp_path)])
        quality.run(args)
        runs = sorted(os.listdir(tmp_path / "runs"))
        # Finished runs are reused, never retrained: a third call trains nothing.
        monkeypatch.setattr(quality, "train_method", lambda *a, **k: pytest.fail("a finished run was retrained"))
        results = quality.run(quality.parse_args(["--quick", "--synthetic", "--steps", "3", "--n-test", "24",
                                                  "--no-progress", "--seeds", "0,1", "--tune", "--tune-factors",
                                                  "1,3", "--lrs", "iapt=0.002,iapt_paper=0.001", "--methods",
                                                  ",".join(methods), "--out", str(tmp_path)]))
    finally:
        torch.set_num_threads(before)
    assert sorted(os.listdir(tmp_path / "runs")) == runs
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["methods"]) == methods
    for name, entry in saved["methods"].items():
        assert 0 <= entry["mean"] <= 1 and entry["ci95_pooled"][0] <= entry["mean"] <= entry["ci95_pooled"][1]
        if name == "zero_shot":
            continue
        assert entry["seeds"] == [0, 1] and entry["steps"] == 3 and entry["trainable_parameters"] > 0
        assert len(entry["curves"]["0"]) == 3 and len(entry["curves"]["1"]) == 3
        assert abs(entry["mean"] - sum(entry["test_accuracy"]) / 2) < 1e-12
    # The sweep: two LRs at seed 0, chosen by dev accuracy (ties: nearest the default).
    for name in methods[1:4]:
        tuning = saved["tuning"][name]
        assert len(tuning["grid"]) == 2
        best = max(zip(tuning["dev_accuracy"], [-abs(lr / quality.DEFAULT_LR[name] - 1) for lr in tuning["grid"]],
                       tuning["grid"]))[2]
        assert tuning["chosen"] == best == saved["methods"][name]["lr"]
    assert saved["methods"]["iapt"]["lr"] == 0.002 and "iapt" not in saved["tuning"]
    # LoRA's rank is chosen to match IAPT's parameter budget as closely as a whole rank allows.
    ratio = saved["methods"]["lora"]["trainable_parameters"] / saved["methods"]["iapt"]["trainable_parameters"]
    assert 0.5 < ratio < 1.5
    md = (tmp_path / "results.md").read_text()
    assert all(entry["label"] in md for entry in saved["methods"].values())
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert results["methods"].keys() == saved["methods"].keys()
    # The cross-task summary quotes every method and checks the targets against these numbers.
    text = quality.summarize(str(root))
    iapt, pt, lora = (saved["methods"][m]["mean"] for m in ("iapt", "prompt_tuning", "lora"))
    assert f"**{iapt:.3f}**" in text and "IAPT, library defaults" in text
    assert ("prompt tuning + 3 = %.3f: %s" % (pt + 0.03, "met" if iapt >= pt + 0.03 else "missed")) in text
    assert ("LoRA − 1 = %.3f: %s" % (lora - 0.01, "met" if iapt >= lora - 0.01 else "missed")) in text
    assert (root / "summary.png").stat().st_size > 1000

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
    import quality, quality_methods, quality_report, quality_runner

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
        monkeypatch.setattr(quality_runner, "train_method", lambda *a, **k: pytest.fail("a finished run was retrained"))
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
        best = max(zip(tuning["dev_accuracy"], [-abs(lr / quality_methods.DEFAULT_LR[name] - 1) for lr in tuning["grid"]],
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
    text = quality_report.summarize(str(root))
    iapt, pt, lora = (saved["methods"][m]["mean"] for m in ("iapt", "prompt_tuning", "lora"))
    assert f"**{iapt:.3f}**" in text and quality_methods.METHOD_LABELS["iapt"] in text
    assert ("prompt tuning + 3 = %.3f: %s" % (pt + 0.03, "met" if iapt >= pt + 0.03 else "missed")) in text
    assert ("LoRA − 1 = %.3f: %s" % (lora - 0.01, "met" if iapt >= lora - 0.01 else "missed")) in text
    assert (root / "summary.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# Generative tasks: greedy generate() scored by exact match, token F1 and chrF
# ---------------------------------------------------------------------------------------------
def test_generative_scores_on_hand_computed_answers():
    from quality_generate import chrf, normalize, score_answers, token_f1
    from iapt_fast.training.evaluation import wilson_interval

    assert normalize("  ELEPHANT \nand more") == "ELEPHANT" and normalize("a   b") == "a b"
    # 1 of 3 predicted tokens is right and it is all of the gold: P = 1/3, R = 1.
    assert token_f1("Andorra la Vella", " Andorra") == pytest.approx(0.5)
    assert token_f1('{"a": 1}', '{"a": 2}') == pytest.approx(6 / 7)  # { " a " : 1 } vs 2: 6 of 7 each side
    # chrF by hand: 1-grams 2/3, 2-grams 1/2, 3-grams 0 (longer orders skipped): P = R = 7/18.
    assert chrf("ABC", "ABD") == pytest.approx(7 / 18)
    assert chrf("abc", "ABC") == 0.0 and chrf("AB C", "ABC") == 1.0  # case counts, spaces do not
    out = score_answers([" X", "y", " Z z"], ["X", "Y", "Z"])
    assert out["correct"] == 1 and out["accuracy"] == pytest.approx(1 / 3)
    assert out["ci95"] == list(wilson_interval(1, 3))
    assert out["f1_scores"] == [1.0, 1.0, pytest.approx(2 / 3)]  # token F1 is lower-cased, exact match is not
    assert out["f1_ci95"][0] <= out["f1"] <= out["f1_ci95"][1]


def test_generate_answers_equals_a_manual_greedy_decode_of_the_iapt_forward():
    """Batched, left-padded IAPTModel.generate (KV cache, prefix at prefill) against one example
    at a time, re-running the whole sequence each step with the prompt as the instruction."""
    import quality_tasks
    from quality_generate import generate_answers
    from iapt_fast import IAPTConfig, get_iapt_model
    from iapt_fast.training.data import tokenize_pair

    task = quality_tasks.GEN_TASKS["caps"]
    load_base, tokenizer, data = quality_tasks.synthetic_setup(task, 0, 40, 4, 6)
    model = get_iapt_model(load_base(), IAPTConfig(bottleneck_dim=8, init_std_up=0.5), seed=2, backend="torch")
    prompts = [task.prompt.format(text=t) for t, _ in data["test"]]
    got = generate_answers(model, tokenizer, prompts, max_new_tokens=5, batch_size=4)
    want = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenize_pair(tokenizer, p, None)["input_ids"]
            n, new = len(ids), []
            for _ in range(5):
                x = torch.tensor([ids + new])
                inst = torch.tensor([[1] * n + [0] * len(new)])
                nxt = int(model(input_ids=x, attention_mask=torch.ones_like(x), instruction_mask=inst).logits[0, -1].argmax())
                if nxt == tokenizer.eos_token_id:
                    break
                new.append(nxt)
            want.append(tokenizer.decode(new, skip_special_tokens=True))
    assert got == want
    assert len(set(got)) > 1  # not vacuous: the answers depend on the prompt


def test_quick_synthetic_generative_report(tmp_path):
    pytest.importorskip("peft")
    import quality
    from quality_gen_summary import summary
    from quality_generate import normalize

    root, tmp_path = tmp_path, tmp_path / "caps"

    methods = ["zero_shot", "lora", "iapt", "iapt_anchors_only"]
    before = torch.get_num_threads()
    try:
        results = quality.run(quality.parse_args(["--quick", "--synthetic", "--task", "caps", "--steps", "3",
                                                  "--n-test", "24", "--no-progress", "--seeds", "0,1",
                                                  "--methods", ",".join(methods), "--out", str(tmp_path)]))
    finally:
        torch.set_num_threads(before)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["methods"]) == methods == list(results["methods"])
    for name, entry in saved["methods"].items():
        seeds = 1 if name == "zero_shot" else 2
        for score in ("f1", "chrf"):
            assert len(entry[score]) == seeds
            # Equal test sets per seed: the pooled mean is the mean of the seeds' means.
            assert entry[f"{score}_mean"] == pytest.approx(sum(entry[score]) / seeds)
            lo, hi = entry[f"{score}_ci95_pooled"]
            assert lo <= entry[f"{score}_mean"] <= hi
    # Every stored prediction is scored as the run says: an exact match has F1 = chrF = 1.
    for run in (tmp_path / "runs").glob("*.json"):
        test = json.loads(run.read_text())["test"]
        exact = [normalize(p) == normalize(g) for _, g, p in test["examples"]]
        assert sum(exact) <= test["correct"] and len(test["f1_scores"]) == test["n"] == 24
        assert all(test["f1_scores"][i] == 1.0 and test["chrf_scores"][i] == 1.0 for i, e in enumerate(exact) if e)
    # Anchors only trains T·d per layer and nothing else (tiny model: T = 4, d = 64, 2 layers).
    assert saved["methods"]["iapt_anchors_only"]["trainable_parameters"] == 4 * 64 * 2
    assert "token F1, pooled mean" in (tmp_path / "results.md").read_text()
    # The cross-method summary: IAPT's token F1 minus LoRA's, paired per example over both seeds.
    f1 = {(r["method"], r["seed"]): r["test"]["f1_scores"]
          for r in (json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json"))}
    diffs = [a - b for s in (0, 1) for a, b in zip(f1[("iapt", s)], f1[("lora", s)])]
    from quality_methods import METHOD_LABELS

    row = next(line for line in summary(str(root)).splitlines() if line.startswith(f"| {METHOD_LABELS['iapt']} |"))
    assert f"| {sum(diffs) / len(diffs):+.3f} [" in row


def test_recipe_ablations_change_what_they_name(tmp_path, monkeypatch):
    """The report's ablations reach the adapter (T, target layers) and the trainer (bi-level on
    a held-out tenth of train, the anchors' own LR) — not just their labels."""
    import quality
    from iapt_fast.training import trainer as trainer_module

    seen = {}
    real_init = trainer_module.Trainer.__init__

    def spy(self, model, config, train_examples, collator, *a, dev_examples=None, **kw):
        seen[config.output_dir.rsplit(os.sep, 1)[-1]] = (config, len(train_examples), dev_examples)
        real_init(self, model, config, train_examples, collator, *a, dev_examples=dev_examples, **kw)

    methods = ["iapt", "iapt_t8", "iapt_top_half", "iapt_bilevel", "iapt_anchor_lr", "iapt_pool_lr"]
    monkeypatch.setattr(trainer_module.Trainer, "__init__", spy)
    before = torch.get_num_threads()
    try:
        quality.run(quality.parse_args(["--quick", "--synthetic", "--task", "caps", "--steps", "2", "--n-test", "8",
                                        "--n-dev", "4", "--dev-too", "--no-progress", "--seeds", "0",
                                        "--methods", ",".join(methods), "--out", str(tmp_path)]))
    finally:
        torch.set_num_threads(before)
    runs = {m: json.loads((tmp_path / "runs" / f"{m}-lr0.001-s0.json").read_text()) for m in methods}
    trained = {m: torch.load(tmp_path / "runs" / "work" / f"{m}-lr0.001-s0" / "trained.pt") for m in methods}
    # T = 8 doubles the anchors (T·d per layer) and W_pool (m·T); the tiny model has 2 layers, d 64, m 8.
    assert trained["iapt_t8"]["generators.adapters.default.layers.0.anchor"].shape[0] == 8
    assert runs["iapt_t8"]["trainable_parameters"] - runs["iapt"]["trainable_parameters"] == 2 * 4 * (64 + 8)
    assert {k.split(".layers.")[1].split(".")[0] for k in trained["iapt_top_half"]} == {"1"}
    default_cfg, n_train, _ = seen["iapt-lr0.001-s0"]
    bilevel_cfg, n_bilevel, dev = seen["iapt_bilevel-lr0.001-s0"]
    assert bilevel_cfg.bilevel and not default_cfg.bilevel
    assert len(dev) == n_train // 10 and n_bilevel + len(dev) == n_train
    assert seen["iapt_anchor_lr-lr0.001-s0"][0].anchor_lr == 0.03 and default_cfg.anchor_lr is None
    assert seen["iapt_pool_lr-lr0.001-s0"][0].pool_lr_scale == 10 and default_cfg.pool_lr_scale == 1
    assert all("dev" in run and "test" in run for run in runs.values())  # --dev-too: a recipe search picks on dev

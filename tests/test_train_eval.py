"""Evaluation and loss plumbing against naive one-example-at-a-time computations.

Runs on plain transformers/PEFT models (tiny random Llama), so it checks the shared code the
quality report uses for every method.
"""
from __future__ import annotations

import pytest
import torch

from iapt_fast.training.data import IAPTCollator, tokenize_records
from iapt_fast.training.evaluation import evaluate_loss, response_loss_sum, score_choices, wilson_interval
from iapt_fast.training.trainer import TrainConfig, Trainer
from train_fixtures import make_llama, sentiment_rows


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def llama(tok):
    return make_llama(len(tok), seed=0)


def _naive_logprob(model, tok, prompt, choice):
    p = tok(prompt)["input_ids"]
    c = tok(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([p + c])).logits[0].double().log_softmax(-1)
    return sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(c))


@pytest.mark.parametrize("side", ["left", "right"])
def test_score_choices_matches_naive(tok, llama, side):
    rows = sentiment_rows(9, seed=5)
    prompts = [f"Review: {r['text']}\nSentiment:" for r in rows]
    single = [c for c in (" good", " bad", " the") if len(tok(c, add_special_tokens=False)["input_ids"]) == 1]
    assert len(single) >= 2, "fixture tokenizer should have single-token words"
    multi = [" very good", " not bad", " great"]
    assert any(len(tok(c, add_special_tokens=False)["input_ids"]) > 1 for c in multi)
    for choices in (single, multi):
        got = score_choices(llama, tok, prompts, choices, batch_size=4, padding_side=side)
        want = torch.tensor([[_naive_logprob(llama, tok, p, c) for c in choices] for p in prompts],
                            dtype=torch.float64)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_evaluate_loss_is_token_weighted(tok, llama):
    rows = sentiment_rows(7, seed=2)
    exs = tokenize_records(tok, [(f"Review: {r['text']}\nSentiment:", " " + r["label"] + " " + "very " * (i % 3))
                                 for i, r in enumerate(rows)])
    total, count = 0.0, 0
    for ex in exs:
        with torch.no_grad():
            logits = llama(input_ids=torch.tensor([ex["input_ids"]])).logits
        loss, n = response_loss_sum(logits, torch.tensor([ex["labels"]]))
        total, count = total + float(loss), count + n
    got = evaluate_loss(llama, exs, IAPTCollator.from_tokenizer(tok), batch_size=3)
    assert got == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("kind", ["lora", "prompt_tuning"])
def test_trimmed_logits_give_the_same_step(tok, kind, tmp_path):
    # The trainer asks the model for logits at labelled positions only; the step must not change.
    peft = pytest.importorskip("peft")
    rows = sentiment_rows(16, seed=4)
    exs = tokenize_records(tok, [(f"Review: {r['text']}\nSentiment:", " " + r["label"]) for r in rows])
    params = []
    for trim in (True, False):
        base = make_llama(len(tok), seed=0)
        cfg = (peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False) if kind == "lora"
               else peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        torch.manual_seed(0)
        model = peft.get_peft_model(base, cfg)
        tr = Trainer(model, TrainConfig(output_dir=str(tmp_path), batch_size=8, max_steps=2, progress=False,
                                        trim_logits=trim, lr=1e-2), exs, IAPTCollator.from_tokenizer(tok))
        tr.train()
        assert tr.accumulator.trim_logits == trim
        params.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)  # textbook value: (0.4038, 0.5962)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0 < hi < 0.35
    with pytest.raises(ValueError, match="total"):
        wilson_interval(0, 0)

"""Trainer mechanics: bi-level parameter split, step isolation, accumulation, exact resume.

A toy model keeps these fast and independent of the backbone integration: a frozen embedding,
one real IAPT generator (iapt_fast.generator, so parameter names and math are the library's)
whose soft tokens shift every position's state, and a frozen tied read-out. The same
properties are checked on IAPTModel in test_train_cli.py.
"""
from __future__ import annotations

import pytest
import torch

from iapt_fast.training.bilevel import is_rational_parameter, split_parameters
from iapt_fast.training.data import IAPTCollator, tokenize_records
from iapt_fast.training.trainer import BatchStream, TrainConfig, Trainer, latest_checkpoint
from train_fixtures import ToyIAPT, sentiment_rows


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def examples(tok):
    rows = sentiment_rows(40, seed=1)
    return tokenize_records(tok, [(f"Review: {r['text']}\nSentiment:", " " + r["label"]) for r in rows], max_length=32)


def _trainer(tok, examples, tmp_path, bilevel=False, seed=0, **kw):
    model = ToyIAPT(len(tok), seed=seed)
    kw = {"batch_size": 4, "lr": 1e-2, "rational_lr": 1e-3, **kw}
    cfg = TrainConfig(output_dir=str(tmp_path), bilevel=bilevel, progress=False, seed=seed, **kw)
    dev = examples[:12] if bilevel else None
    return Trainer(model, cfg, examples[12:] if bilevel else examples, IAPTCollator.from_tokenizer(tok),
                   dev_examples=dev)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_split_by_name(tok):
    model = ToyIAPT(len(tok))
    weights, rationals = split_parameters(model)
    assert {n.rsplit(".", 1)[1] for n, _ in rationals} == {"rat_num", "rat_den"}
    assert {n.rsplit(".", 1)[1] for n, _ in weights} == {"w_down", "w_pool", "w_up", "anchor"}  # the anchor trains on train
    assert "embed.weight" not in {n for n, _ in weights + rationals}  # frozen: in neither
    assert not is_rational_parameter("layers.0.rat_numerator_scale") and is_rational_parameter("x.rat_den")


def test_bilevel_steps_touch_only_their_parameters(tok, examples, tmp_path):
    tr = _trainer(tok, examples, tmp_path, bilevel=True, weight_decay=0.1)
    model = tr.model
    rational = {n for n, _ in model.named_parameters() if is_rational_parameter(n)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):  # the second round has Adam state: momentum must not leak either
        before = _snapshot(model)
        tr.weight_step()
        assert _changed(before, model) == trainable - rational
        before = _snapshot(model)
        tr.dev_step()
        assert _changed(before, model) == rational
        assert all(p.grad is None for p in model.parameters())
    # requires_grad is restored after each step
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_bilevel_dev_step_uses_dev_split_only(tok, examples, tmp_path):
    tr = _trainer(tok, examples, tmp_path, bilevel=True)
    train_pos = tr.train_stream.state_dict()
    tr.dev_step()
    assert tr.train_stream.state_dict() == train_pos and tr.dev_stream.pos == 4


def test_joint_step_updates_everything(tok, examples, tmp_path):
    tr = _trainer(tok, examples, tmp_path)
    before = _snapshot(tr.model)
    tr.train_step()
    assert _changed(before, tr.model) == {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert tr.optimizers["joint"].param_groups[1]["lr"] != tr.optimizers["joint"].param_groups[0]["lr"]


def test_rational_lr_defaults():
    assert TrainConfig(bilevel=True).resolved_rational_lr == 1e-6
    assert TrainConfig(lr=3e-4).resolved_rational_lr == 3e-4
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_bilevel_requires_dev_split(tok, examples, tmp_path):
    with pytest.raises(ValueError, match="dev_examples"):
        Trainer(ToyIAPT(len(tok)), TrainConfig(output_dir=str(tmp_path), bilevel=True), examples,
                IAPTCollator.from_tokenizer(tok))


def test_gradient_accumulation_matches_full_batch(tok, examples, tmp_path):
    # Same 8 examples either way (the stream's permutation is fixed by the seed); the loss is
    # normalised over all labelled tokens, so one accumulated step equals one big step.
    a = _trainer(tok, examples, tmp_path / "a", batch_size=8, grad_accum=1, max_grad_norm=None, max_steps=5)
    b = _trainer(tok, examples, tmp_path / "b", batch_size=4, grad_accum=2, max_grad_norm=None, max_steps=5)
    ra, rb = a.train_step(), b.train_step()
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    for (n, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("bilevel", [False, True])
def test_resume_is_exact(tok, examples, tmp_path, bilevel):
    kw = dict(bilevel=bilevel, max_steps=9, grad_accum=2, warmup_steps=2, weight_decay=0.01, save_every=4,
              save_total_limit=1)
    straight = _trainer(tok, examples, tmp_path / "straight", **kw)
    straight.train()
    first = _trainer(tok, examples, tmp_path / "split", **kw)
    first.train(stop_after=5)  # checkpoint at step 4, then one step that the resumed run redoes
    ckpt = latest_checkpoint(str(tmp_path / "split"))
    assert ckpt.endswith("checkpoint-4")
    # A fresh process: different initial weights and RNG, everything must come from the checkpoint.
    torch.manual_seed(1234)
    resumed = _trainer(tok, examples, tmp_path / "split", seed=0, **kw)
    with torch.no_grad():
        for p in resumed.model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    resumed.train(resume_from="auto")
    assert resumed.step == straight.step == 9
    for (n, pa), (_, pb) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(pa, pb), n
    for key in straight.optimizers:
        sa, sb = straight.optimizers[key].state_dict()["state"], resumed.optimizers[key].state_dict()["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]


def test_resume_rejects_other_data(tok, examples, tmp_path):
    tr = _trainer(tok, examples, tmp_path, max_steps=4, save_every=2)
    tr.train()
    other = _trainer(tok, examples[:30], tmp_path, max_steps=4)
    with pytest.raises(ValueError, match="same data"):
        other.train(resume_from=str(tmp_path / "checkpoint-2"))


def test_batch_stream_epochs():
    stream = BatchStream(list(range(10)), 4, lambda xs: xs, seed=3)
    seen = [stream.next_batch() for _ in range(3)]
    assert sorted(sum(seen, [])) == list(range(10)) and len(seen[-1]) == 2
    again = BatchStream(list(range(10)), 4, lambda xs: xs, seed=3)
    again.load_state_dict(stream.state_dict())
    assert again.next_batch() == stream.next_batch()

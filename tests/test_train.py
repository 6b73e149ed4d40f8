"""Trainer mechanics: bi-level parameter split, step isolation, accumulation, exact resume.

A toy model keeps these fast and independent of the backbone integration: a frozen embedding,
one real IAPT generator (iapt_fast.generator, so parameter names and math are the library's)
whose soft tokens shift every position's state, and a frozen tied read-out. The same
properties are checked on IAPTModel in test_train_cli.py.
"""
from __future__ import annotations

import math

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


@pytest.mark.parametrize("bilevel", [False, True])
def test_anchor_lr_moves_only_the_anchors_at_their_own_rate(tok, examples, tmp_path, bilevel):
    # lr 0 for the generator weights: only the anchors (anchor_lr) and, joint, the rationals move.
    tr = _trainer(tok, examples, tmp_path, bilevel=bilevel, lr=1e-12, rational_lr=0.0, anchor_lr=0.1,
                  warmup_ratio=0.0, max_steps=10)
    before = _snapshot(tr.model)
    tr.train_step()
    moved = {n: (before[n] - p.detach()).abs().max().item() for n, p in tr.model.named_parameters() if p.requires_grad}
    anchors = [n for n in moved if n.endswith(".anchor")]
    assert anchors and all(moved[n] > 1e-2 for n in anchors)  # Adam's first step: ~anchor_lr per entry
    assert all(moved[n] < 1e-9 for n in moved if n not in anchors)
    groups = tr.optimizers["weights" if bilevel else "joint"].param_groups
    assert sorted(g["initial_lr"] for g in groups)[-1] == 0.1  # the schedule scales every group alike


def test_pool_lr_scale_scales_only_the_pooling_steps(tok, examples, tmp_path):
    # Adam's first step moves every entry by ~its LR: W_pool at lr × pool_lr_scale, the rest at lr.
    tr = _trainer(tok, examples, tmp_path, lr=1e-4, rational_lr=1e-4, pool_lr_scale=100.0, anchor_lr=1e-4,
                  warmup_ratio=0.0, max_grad_norm=None, max_steps=10)
    before = _snapshot(tr.model)
    tr.train_step()
    moved = {n: (before[n] - p.detach()).abs().max().item() for n, p in tr.model.named_parameters() if p.requires_grad}
    pools = [n for n in moved if n.endswith(".w_pool")]
    assert pools and all(5e-3 < moved[n] < 2e-2 for n in pools)
    assert all(moved[n] < 2e-4 for n in moved if n not in pools)
    assert sorted(g["initial_lr"] for g in tr.optimizers["joint"].param_groups) == [1e-4, 1e-4, 1e-4, 1e-2]


def test_pool_lr_scale_defaults_to_3_where_there_is_a_pooling(tok, examples, tmp_path):
    """Left unset, W_pool trains at 3× the LR; a model without pooling weights (anchors only)
    trains as before, while an explicit scale there is refused."""
    from iapt_fast import IAPTConfig, get_iapt_model
    from iapt_fast.training.train_config import DEFAULT_POOL_LR_SCALE

    from train_fixtures import make_llama

    assert TrainConfig().pool_lr_scale is None and DEFAULT_POOL_LR_SCALE == 3.0
    tr = _trainer(tok, examples, tmp_path, lr=1e-4, rational_lr=1e-4, warmup_ratio=0.0, max_grad_norm=None,
                  max_steps=10)
    assert sorted(g["initial_lr"] for g in tr.optimizers["joint"].param_groups) == pytest.approx([1e-4, 1e-4, 3e-4])
    before = _snapshot(tr.model)
    tr.train_step()
    moved = {n: (before[n] - p.detach()).abs().max().item() for n, p in tr.model.named_parameters() if p.requires_grad}
    pools = [n for n in moved if n.endswith(".w_pool")]
    assert pools and all(2e-4 < moved[n] < 6e-4 for n in pools)
    anchors_only = get_iapt_model(make_llama(len(tok)), IAPTConfig(num_soft_tokens=2, anchors_only=True))
    tr = Trainer(anchors_only, TrainConfig(output_dir=str(tmp_path / "a"), lr=1e-3, progress=False), examples,
                 IAPTCollator.from_tokenizer(tok))
    assert [g["initial_lr"] for g in tr.optimizers["joint"].param_groups] == [1e-3]
    with pytest.raises(ValueError, match="pool_lr_scale"):
        Trainer(anchors_only, TrainConfig(output_dir=str(tmp_path / "b"), pool_lr_scale=3.0, progress=False),
                examples, IAPTCollator.from_tokenizer(tok))


def test_anchor_lr_without_anchors_is_refused(tok, examples, tmp_path):
    from iapt_fast import IAPTConfig, get_iapt_model

    from train_fixtures import make_llama

    model = get_iapt_model(make_llama(len(tok)), IAPTConfig.paper(num_soft_tokens=2, bottleneck_dim=8))
    with pytest.raises(ValueError, match="anchor_lr"):
        Trainer(model, TrainConfig(output_dir=str(tmp_path), anchor_lr=1e-2, progress=False), examples,
                IAPTCollator.from_tokenizer(tok))
    with pytest.raises(ValueError, match="anchor_lr"):
        TrainConfig(anchor_lr=-1.0)


def test_lr_schedules():
    from iapt_fast.training.trainer import lr_factor

    for schedule in ("linear", "cosine", "constant"):
        f = lr_factor(schedule, warmup=4, total=20)
        assert [f(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8] and f(4) == 1.0
        end = {"linear": 1 / 16, "cosine": 0.5 * (1 + math.cos(math.pi * 15 / 16)), "constant": 1.0}[schedule]
        assert f(19) == pytest.approx(end)
    assert lr_factor("cosine", 0, 10)(5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


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
    with pytest.raises(ValueError, match=r"other data.*train examples \(tokenized\): checkpoint sha256:\w+ \(40 rows\), "
                                         r"this run sha256:\w+ \(30 rows\)"):
        other.train(resume_from=str(tmp_path / "checkpoint-2"))


def test_batch_stream_epochs():
    stream = BatchStream(list(range(10)), 4, lambda xs: xs, seed=3)
    seen = [stream.next_batch() for _ in range(3)]
    assert sorted(sum(seen, [])) == list(range(10)) and len(seen[-1]) == 2
    again = BatchStream(list(range(10)), 4, lambda xs: xs, seed=3)
    again.load_state_dict(stream.state_dict())
    assert again.next_batch() == stream.next_batch()


# ------------------------------------------------------------------------------ structure of the training code
def _imports(path):
    """The iapt_fast modules ``path`` imports (TYPE_CHECKING blocks and function bodies included)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("iapt_fast"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("iapt_fast"))
    return found


def test_training_modules_import_no_cycle():
    import glob
    import os

    import iapt_fast

    root = os.path.dirname(iapt_fast.__file__)
    files = glob.glob(os.path.join(root, "training", "*.py")) + [os.path.join(root, "train.py")]
    name = {f: "iapt_fast." + os.path.relpath(f, os.path.dirname(root))[len("iapt_fast/"):-3].replace(os.sep, ".")
            for f in files}
    graph = {name[f]: {m for m in _imports(f) if m in name.values()} for f in files}
    path: list[str] = []

    def visit(module, done=set()):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_checkpoints_are_functions_of_explicit_state(tok, examples, tmp_path):
    # Save and restore with no Trainer: the run's state goes in and comes back as a RunState.
    from iapt_fast.training.dist_context import SINGLE_PROCESS
    from iapt_fast.training.trainer_checkpoints import (RunSetup, RunState, Trainables, load_checkpoint,
                                                        save_checkpoint)

    tr = _trainer(tok, examples, tmp_path, max_steps=4, save_total_limit=1)
    tr.train(stop_after=2)
    parts, setup = tr.trainables, RunSetup(tr.config, tr.max_steps, tr.warmup_steps, tr.fingerprint)
    assert isinstance(parts, Trainables)
    assert tr.run_setup() == setup
    before = _snapshot(tr.model)
    run = RunState(step=2, history=[{"step": 1, "loss": 0.5}], run_id=tr.run_id, checkpoints=["checkpoint-1"])
    path, saved = save_checkpoint(run, parts, setup, SINGLE_PROCESS)
    assert path == str(tmp_path / "checkpoint-2")
    assert saved.checkpoints == ["checkpoint-2"] and run.checkpoints == ["checkpoint-1"]  # pruned; input untouched
    tr.train_step()
    assert any(not torch.equal(before[n], p) for n, p in tr.model.named_parameters())
    loaded = load_checkpoint(path, parts, setup, SINGLE_PROCESS)
    assert (loaded.step, loaded.history, loaded.run_id) == (2, run.history, run.run_id)
    # The list as written, before that save's prune: a save killed before pruning is pruned on resume.
    assert loaded.checkpoints == ["checkpoint-1", "checkpoint-2"]
    assert all(torch.equal(before[n], p) for n, p in tr.model.named_parameters())


def test_logits_to_keep_is_decided_once_from_the_forward_signature(tok, examples, tmp_path):
    from iapt_fast.training.accumulation import accepts_logits_to_keep

    class Takes(torch.nn.Module):
        def forward(self, input_ids, logits_to_keep=0):
            return input_ids

    class Passes(torch.nn.Module):  # a wrapper that sends its keywords on to ``base_model``
        def __init__(self, inner):
            super().__init__()
            self.base_model = inner

        def forward(self, **kwargs):
            return self.base_model(**kwargs)

    assert accepts_logits_to_keep(Takes()) and accepts_logits_to_keep(Passes(Takes()))
    assert not accepts_logits_to_keep(Passes(torch.nn.Linear(2, 2)))
    # ToyIAPT's forward names its arguments and not this one: full logits, known before any step.
    tr = _trainer(tok, examples, tmp_path, max_steps=1)
    assert tr.accumulator.trim_logits is False


def test_a_fresh_start_raises_by_kind_whatever_the_folder_is_called(tok, examples, tmp_path):
    from iapt_fast.training.checkpoints import OutputDirNotEmpty

    out = tmp_path / "not a folder"  # words of the bad-path message, in another run's output folder
    done = _trainer(tok, examples, out, max_steps=1)
    done.train()
    done.save_history()
    with pytest.raises(OutputDirNotEmpty, match="already holds a run's output"):
        _trainer(tok, examples, out, max_steps=1).train()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder") as err:
        _trainer(tok, examples, tmp_path / "file", max_steps=1).train()
    assert not isinstance(err.value, OutputDirNotEmpty)

"""Saves that a crash cannot lose: the writer is killed (SIGKILL) right after each of its
renames, fsyncs and deletions in turn, and the folder must then hold the old or the new
adapter / checkpoint, complete; the next save cleans up whatever the dead writer left.

The writer runs in a forked child whose os.replace / rename / fsync / remove / unlink / rmdir
count their calls and kill the process after the k-th; k runs over every step of the save
until the save completes, so no step is skipped and nothing depends on timing.
"""
from __future__ import annotations

import os
import shutil
import signal
from typing import Callable

import pytest
import torch

from iapt_fast import IAPTConfig, IAPTModel, get_iapt_model
from iapt_fast.model.adapter_io import read_adapter
from iapt_fast.training.checkpoints import find_resumable, read_state
from iapt_fast.training.data import IAPTCollator, tokenize_records
from iapt_fast.training.trainer import TrainConfig, Trainer
from slow_reference import tiny_model
from train_fixtures import make_llama, sentiment_rows

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")]

_STEPS = ("replace", "rename", "fsync", "remove", "unlink", "rmdir")


def _killed_after(k: int, save: Callable[[], None]) -> bool:
    """Run ``save`` in a forked child that kills itself right after its k-th step; True if it
    was killed, False if the save finished in fewer steps."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            done = [0]

            def counted(fn):
                def step(*args, **kwargs):
                    out = fn(*args, **kwargs)
                    done[0] += 1
                    if done[0] == k:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return out
                return step

            for name in _STEPS:
                setattr(os, name, counted(getattr(os, name)))
            save()
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the save failed in the child: {status}"
    return False


def _every_crash_point(reset: Callable[[], None], save: Callable[[], None], check: Callable[[int], None]) -> int:
    """For k = 1, 2, ...: restore the old state, kill the save after step k, check; returns
    the number of steps the save has (at least one crash must have been observed)."""
    k = 0
    while True:
        k += 1
        reset()
        killed = _killed_after(k, save)
        check(k)
        if not killed:
            assert k > 1, "the writer was never killed: the harness counted no step"
            return k - 1


def _hidden(folder) -> list[str]:
    return sorted(e for e in os.listdir(folder) if e.startswith("."))


def _tensors(path) -> dict[str, torch.Tensor]:
    return read_adapter(path, 32, 2)[1]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _adapter(seed, **cfg):
    return get_iapt_model(tiny_model("llama"), IAPTConfig(**{"bottleneck_dim": 8, "init_std_up": 0.5, **cfg}),
                          seed=seed, backend="torch")


@pytest.mark.parametrize("layout", ["adapter_folder", "run_folder", "new_folder"])
def test_a_save_killed_after_any_step_leaves_the_old_or_the_new_adapter(tmp_path, layout):
    old, new = _adapter(1), _adapter(2, num_soft_tokens=3, bottleneck_dim=12)  # a mix could not load
    old.save_pretrained(tmp_path / "old_ref")
    new.save_pretrained(tmp_path / "new_ref")
    want_old, want_new = _tensors(tmp_path / "old_ref"), _tensors(tmp_path / "new_ref")
    parent = tmp_path / "work"
    target = parent / "adapter"
    host = IAPTModel(tiny_model("llama"), None, backend="torch")
    seen = set()

    def reset():
        shutil.rmtree(parent, ignore_errors=True)
        parent.mkdir()
        if layout != "new_folder":
            old.save_pretrained(target)
        if layout == "run_folder":  # the CLI's output folder: checkpoints and metrics next to the adapter
            (target / "checkpoint-1").mkdir()
            (target / "checkpoint-1" / "keep.txt").write_text("mine")
            (target / "metrics.json").write_text("{}")

    def check(k):
        try:
            got = _tensors(target)
        except FileNotFoundError:
            assert layout == "new_folder", f"killed after step {k}: no adapter at {target}"
            got = None
        assert got is None or _same(got, want_old) or _same(got, want_new), f"killed after step {k}: a mixed adapter"
        seen.add("none" if got is None else "old" if _same(got, want_old) else "new")
        if got is not None:  # the public loader agrees
            host.load_adapter(target, f"k{k}")
            host.delete_adapter(f"k{k}")
        # The next save finishes or discards what the dead writer left, and leaves nothing behind.
        new.save_pretrained(target)
        assert _same(_tensors(target), want_new)
        assert _hidden(target) == [] and _hidden(parent) == [], f"killed after step {k}: leftovers"
        if layout == "run_folder":
            assert (target / "checkpoint-1" / "keep.txt").read_text() == "mine"
            assert sorted(os.listdir(target)) == ["adapter_config.json", "adapter_model.safetensors",
                                                  "checkpoint-1", "metrics.json"]

    steps = _every_crash_point(reset, lambda: new.save_pretrained(target), check)
    assert steps >= 3
    assert seen == ({"none", "new"} if layout == "new_folder" else {"old", "new"})


def test_a_config_save_killed_after_any_step_leaves_the_old_or_the_new_config(tmp_path):
    old, new = IAPTConfig(num_soft_tokens=2), IAPTConfig(num_soft_tokens=3, bottleneck_dim=12)
    seen = set()

    def reset():
        shutil.rmtree(tmp_path / "cfg", ignore_errors=True)
        old.save_pretrained(tmp_path / "cfg")

    def check(k):
        got = IAPTConfig.from_pretrained(tmp_path / "cfg")
        assert got in (old, new), f"killed after step {k}: {got}"
        seen.add("old" if got == old else "new")

    assert _every_crash_point(reset, lambda: new.save_pretrained(tmp_path / "cfg"), check) >= 2
    assert seen == {"old", "new"}


# ------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def examples(tok):
    rows = sentiment_rows(16, seed=3)
    return tokenize_records(tok, [(f"Review: {r['text']}\nSentiment:", " " + r["label"]) for r in rows], max_length=32)


def _trainer(tok, examples, out, **kw):
    model = get_iapt_model(make_llama(len(tok)), IAPTConfig(num_soft_tokens=2, bottleneck_dim=8), seed=0)
    cfg = TrainConfig(output_dir=str(out), **{"batch_size": 4, "lr": 1e-2, "max_steps": 6, "progress": False,
                                               "save_total_limit": 1, **kw})
    return Trainer(model, cfg, examples, IAPTCollator.from_tokenizer(tok))


def _consistent(path) -> int:
    """The step of checkpoint ``path``, after checking its adapter files hold its state's weights."""
    state = read_state(path)
    adapter = _tensors(path)
    params = {n.split("default.", 1)[1]: p for n, p in state["params"].items()}
    assert params and params.keys() <= adapter.keys()  # the adapter also holds the fixed anchor scales
    assert _same({k: adapter[k] for k in params}, params), f"{path}: adapter files and state of different saves"
    return state["step"]


@pytest.mark.parametrize("case", ["next_checkpoint_and_prune", "replace_checkpoint"])
def test_a_checkpoint_save_killed_after_any_step_leaves_a_complete_checkpoint(tok, examples, tmp_path, case):
    out = tmp_path / "out"
    trainer = _trainer(tok, examples, out)
    trainer.train(stop_after=2)
    trainer.save_checkpoint()
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    trainer.train(stop_after=3)
    target = None if case == "next_checkpoint_and_prune" else str(out / "checkpoint-2")
    seen = set()

    def reset():
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        trainer.run.checkpoints = ["checkpoint-2"]

    def check(k):
        found = find_resumable(str(out))
        assert found is not None, f"killed after step {k}: no resumable checkpoint"
        path, state = found
        step = _consistent(path)
        assert step == state["step"] and step in (2, 3), f"killed after step {k}"
        if case == "replace_checkpoint":
            assert path == str(out / "checkpoint-2")
        seen.add(step)
        resumed = _trainer(tok, examples, out)
        resumed.train(resume_from="auto", stop_after=step + 1)  # resumes, trains, saves, prunes
        resumed.save_checkpoint()
        assert _hidden(out) == [], f"killed after step {k}: leftovers"
        for name in os.listdir(out):
            if name.startswith("checkpoint-"):
                assert _hidden(out / name) == [], f"killed after step {k}: leftovers in {name}"
        assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == [f"checkpoint-{step + 1}"]

    _every_crash_point(reset, lambda: trainer.save_checkpoint(target), check)
    assert seen == {2, 3}

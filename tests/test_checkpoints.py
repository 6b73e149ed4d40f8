"""Checkpoints that never lose or mix up a run: folder ownership, pruning, corrupt states,
resume checks, and preemption (SIGTERM / SIGINT) in the Trainer and the CLI."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from iapt_fast import IAPTConfig, get_iapt_model
from iapt_fast.training.checkpoints import OutputDirNotEmpty, TrainingInterrupted, latest_checkpoint
from iapt_fast.training.data import IAPTCollator, tokenize_records
from iapt_fast.train import main
from iapt_fast.training.trainer import TrainConfig, Trainer
from train_fixtures import ToyIAPT, make_llama, save_tiny_model, sentiment_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def examples(tok):
    rows = sentiment_rows(24, seed=3)
    return tokenize_records(tok, [(f"Review: {r['text']}\nSentiment:", " " + r["label"]) for r in rows], max_length=32)


def _toy(tok, examples, out, perturb=False, model=None, **kw):
    """``perturb``: start the trainable weights elsewhere (a resumed run must restore them all)."""
    kw = {"batch_size": 4, "lr": 1e-2, "max_steps": 6, "progress": False, **kw}
    model = model if model is not None else ToyIAPT(len(tok), seed=0)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(1.0)
    return Trainer(model, TrainConfig(output_dir=str(out), **kw), examples, IAPTCollator.from_tokenizer(tok))


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _ckpts(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))


def test_a_fresh_run_never_prunes_or_resumes_another_runs_checkpoints(tok, examples, tmp_path):
    out = tmp_path / "out"
    _toy(tok, examples, out, max_steps=6, save_every=1, save_total_limit=2).train()
    assert _ckpts(out) == ["checkpoint-4", "checkpoint-5"]
    with pytest.raises(OutputDirNotEmpty, match="already holds a run's output.*checkpoint-4.*overwrite_output_dir"):
        _toy(tok, examples, out, max_steps=3, save_every=1).train()
    new = _toy(tok, examples, out, max_steps=3, save_every=1, save_total_limit=1, overwrite_output_dir=True)
    new.train(stop_after=2)
    # Its own checkpoint-1 was pruned by its own limit; the old run's 4 and 5 are untouched.
    assert _ckpts(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")  # not the stale checkpoint-5
    resumed = _toy(tok, examples, out, perturb=True, max_steps=3, save_every=1, save_total_limit=1)
    resumed.train(resume_from="auto")
    assert resumed.step == 3 and resumed.run_id == new.run_id is not None
    straight = _toy(tok, examples, tmp_path / "straight", max_steps=3)
    straight.train()
    assert all(torch.equal(a, b) for a, b in zip(_params(straight).values(), _params(resumed).values()))


def test_resume_auto_skips_a_corrupt_checkpoint_and_explicit_resume_names_it(tok, examples, tmp_path):
    out = tmp_path / "out"
    _toy(tok, examples, out, max_steps=5, save_every=1, save_total_limit=3).train()
    state = out / "checkpoint-4" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.warns(UserWarning, match="checkpoint-4.*truncated or corrupt"):
        assert latest_checkpoint(str(out)) == str(out / "checkpoint-3")
    fresh = _toy(tok, examples, out, perturb=True, max_steps=5, save_every=1, save_total_limit=3)
    before = _params(fresh)
    with pytest.raises(ValueError, match="checkpoint-4/trainer_state.pt' is truncated or corrupt"):
        fresh.train(resume_from=str(out / "checkpoint-4"))
    assert fresh.step == 0 and all(torch.equal(before[n], p) for n, p in _params(fresh).items())
    (out / "checkpoint-3" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="checkpoint-3/trainer_state.pt' is empty"):
        fresh.train(resume_from=str(out / "checkpoint-3"))
    with pytest.warns(UserWarning, match="skipped unreadable checkpoints"):
        fresh.train(resume_from="auto")
    assert fresh.step == 5


def test_resume_refuses_other_hyper_parameters_and_adapter_shapes(tok, examples, tmp_path):
    out = tmp_path / "out"
    _toy(tok, examples, out, max_steps=4, save_every=2).train()
    ckpt = str(out / "checkpoint-2")
    with pytest.raises(ValueError, match=r"batch_size: checkpoint 4, this run 2; lr: checkpoint 0\.01, this run 0\.005"):
        _toy(tok, examples, out, max_steps=4, lr=5e-3, batch_size=2).train(resume_from=ckpt)
    with pytest.raises(ValueError, match="max_steps: checkpoint 4, this run 8"):
        _toy(tok, examples, out, max_steps=8).train(resume_from=ckpt)
    # IAPTModel: another bottleneck (shapes) or another adapter config (same shapes)
    def iapt(**cfg):
        return get_iapt_model(make_llama(len(tok)), IAPTConfig(num_soft_tokens=2, bottleneck_dim=8, **cfg), seed=0)
    run = tmp_path / "iapt"
    _toy(tok, examples, run, model=iapt(), max_steps=2, save_every=1).train()
    with pytest.raises(ValueError, match=r"w_down has shape \(32, 8\), this model's is \(32, 12\).*bottleneck_dim"):
        _toy(tok, examples, run, model=get_iapt_model(make_llama(len(tok)), IAPTConfig(num_soft_tokens=2, bottleneck_dim=12)),
             max_steps=2).train(resume_from="auto")
    with pytest.raises(ValueError, match="another adapter config: pool_input: checkpoint 'normed', this run 'hidden'"):
        _toy(tok, examples, run, model=iapt(pool_input="hidden"), max_steps=2).train(resume_from="auto")


def _signal_at(monkeypatch, step: int, signum: int) -> None:
    real = Trainer.train_step

    def step_then_signal(self):
        record = real(self)
        if self.step == step:
            os.kill(os.getpid(), signum)
        return record

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_the_step_and_resume_loses_nothing(tok, examples, tmp_path, monkeypatch, signum):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    out = tmp_path / "out"
    _signal_at(monkeypatch, 3, signum)
    first = _toy(tok, examples, out, max_steps=6)  # no save_every: only the interrupt writes one
    with pytest.raises(TrainingInterrupted, match=f"{signal.Signals(signum).name} after step 3") as stop:
        first.train()
    monkeypatch.undo()
    assert stop.value.checkpoint == str(out / "checkpoint-3") and _ckpts(out) == ["checkpoint-3"]
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # handlers restored
    resumed = _toy(tok, examples, out, perturb=True, max_steps=6)
    resumed.train(resume_from="auto")
    straight = _toy(tok, examples, tmp_path / "straight", max_steps=6)
    straight.train()
    assert resumed.step == 6
    assert all(torch.equal(a, b) for a, b in zip(_params(straight).values(), _params(resumed).values()))


# ------------------------------------------------------------------------------ the CLI
def _cli(tmp_path, *extra):
    model_dir = save_tiny_model(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(24, seed=1))
    return ["--model", model_dir, "--train-file", train, "--prompt-template", "Review: {text}\\nSentiment:",
            "--response-template", " {label}", "--batch-size", "4", "--bottleneck-dim", "8", "--num-soft-tokens",
            "2", "--no-progress", "--max-length", "32", "--output-dir", str(tmp_path / "out"), *extra]


def test_cli_sigterm_exits_143_with_a_checkpoint_and_resumes(tmp_path, monkeypatch, capsys):
    argv = _cli(tmp_path, "--max-steps", "5")
    _signal_at(monkeypatch, 2, signal.SIGTERM)
    assert main(argv) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert "interrupted by SIGTERM after step 2" in capsys.readouterr().err
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.pt").is_file()
    assert main(argv + ["--resume", "auto"]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 5


@pytest.mark.parametrize("extra,words", [
    (["--attn-implementation", "flash_attention_2"], "--attn-implementation: invalid choice"),
    (["--target-layers", "0,7"], "--target-layers entry 7 is out of range for a model with 2 layers"),
    (["--init-std-up", "inf"], "--init-std-up must be a finite float"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--warmup-steps", "-3"], "--warmup-steps must be"),
    (["--rational-degrees", "6"], "--rational-degrees: expected 2 comma-separated values"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--resume", "nowhere"], "no trainer_state.pt in 'nowhere'"),
])
def test_cli_arguments_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys, extra, words):
    import transformers

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    with pytest.raises(SystemExit) as exc:
        main(_cli(tmp_path, *extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and words in err and "Traceback" not in err


def test_cli_refuses_a_used_output_dir_unless_told(tmp_path, capsys):
    argv = _cli(tmp_path, "--max-steps", "2")
    assert main(argv) == 0
    with pytest.raises(SystemExit):
        main(argv)
    assert "already holds a run's output" in capsys.readouterr().err
    assert main(argv + ["--overwrite-output-dir"]) == 0


def test_resume_auto_without_a_checkpoint_says_what_the_folder_holds(tok, examples, tmp_path):
    out = tmp_path / "out"
    done = _toy(tok, examples, out, max_steps=2)
    done.train()
    done.save_history()  # a finished run: its output, no checkpoint
    with pytest.raises(OutputDirNotEmpty, match=r"resume_from='auto' \(--resume auto\) found nothing to continue in "
                                                r"output_dir '.*out': it holds history.jsonl but no readable checkpoint"):
        _toy(tok, examples, out, max_steps=2).train(resume_from="auto")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"output_dir '.*file' is a file, not a folder"):
        _toy(tok, examples, tmp_path / "file", max_steps=2).train()

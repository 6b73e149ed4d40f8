"""Resume is exact or refused, for the data too: a checkpoint records a fingerprint of
everything that decides the batches, and a resume whose data or data preparation differ is
refused, naming each difference; an identical resume continues bit for bit."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from iapt_fast.model.adapter_io import read_adapter
from iapt_fast.train import main
from iapt_fast.training.checkpoints import ResumeRefused
from iapt_fast.training.data import IAPTCollator, tokenize_records
from iapt_fast.training.fingerprint import fingerprint_diffs, tokenizer_digest
from iapt_fast.training.trainer import TrainConfig, Trainer
from train_fixtures import ToyIAPT, make_tokenizer, save_tiny_model, sentiment_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(rows):
    return [(f"Review: {r['text']}\nSentiment:", " " + r["label"]) for r in rows]


def _toy(tok, examples, out, **kw):
    cfg = TrainConfig(output_dir=str(out), **{"batch_size": 4, "lr": 1e-2, "max_steps": 4, "progress": False, **kw})
    return Trainer(ToyIAPT(len(tok), seed=0), cfg, examples, IAPTCollator.from_tokenizer(tok))


def test_trainer_refuses_other_examples_of_the_same_count_and_resumes_identical_ones(tok, tmp_path):
    rows = sentiment_rows(16, seed=3)
    examples = tokenize_records(tok, _pairs(rows), max_length=32)
    out = tmp_path / "out"
    _toy(tok, examples, out, save_every=2).train(stop_after=2)
    others = tokenize_records(tok, _pairs(sentiment_rows(16, seed=4)), max_length=32)
    shuffled = examples[1:] + examples[:1]
    shorter = tokenize_records(tok, _pairs(rows), max_length=12)
    for changed in (others, shuffled, shorter):
        fresh = _toy(tok, changed, out)
        before = {n: p.clone() for n, p in fresh.model.named_parameters()}
        with pytest.raises(ResumeRefused, match=r"other data or data preparation.*train examples \(tokenized\): "
                                                r"checkpoint sha256:\w{16} \(16 rows\), this run sha256:\w{16}"):
            fresh.train(resume_from="auto")
        assert fresh.step == 0 and all(torch.equal(before[n], p) for n, p in fresh.model.named_parameters())
    with pytest.raises(ResumeRefused, match=r"collator: checkpoint \{'class': 'IAPTCollator', "
                                            r"'pad_token_id': 0, 'padding_side': 'right'.*this run .*'left'"):
        Trainer(ToyIAPT(len(tok)), TrainConfig(output_dir=str(out), batch_size=4, lr=1e-2, max_steps=4, progress=False),
                examples, IAPTCollator(0, "left")).train(resume_from="auto")
    resumed = _toy(tok, examples, out)
    resumed.train(resume_from="auto")
    straight = _toy(tok, examples, tmp_path / "straight")
    straight.train()
    assert resumed.step == straight.step == 4
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n


def test_fingerprint_diffs_name_only_recorded_entries_that_differ():
    saved = {"--max-length": 32, "--no-eos": False, "tokenizer": "sha256:aaaa (X, 4 tokens)"}
    now = {"--max-length": 24, "--no-eos": False, "tokenizer": "sha256:bbbb (X, 4 tokens)", "new entry": 1}
    assert fingerprint_diffs(saved, now) == ["--max-length: checkpoint 32, this run 24",
                                             "tokenizer: checkpoint sha256:aaaa (X, 4 tokens), this run "
                                             "sha256:bbbb (X, 4 tokens)"]
    assert fingerprint_diffs(None, now) == []  # a checkpoint written without a fingerprint


def test_tokenizer_digest_follows_the_vocabulary_not_the_path(tmp_path):
    a, b = make_tokenizer(), make_tokenizer()
    assert tokenizer_digest(a) == tokenizer_digest(b)
    b.save_pretrained(tmp_path / "copy")
    from transformers import AutoTokenizer
    assert tokenizer_digest(AutoTokenizer.from_pretrained(tmp_path / "copy")) == tokenizer_digest(a)
    b.add_tokens(["zzzq"])
    assert tokenizer_digest(b) != tokenizer_digest(a)


# ------------------------------------------------------------------------------ the CLI
def _interrupt_at(monkeypatch, step: int) -> None:
    real = Trainer.train_step

    def step_then_sigterm(self):
        record = real(self)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)


def _argv(model, train, out, *extra):
    return ["--model", model, "--train-file", train, "--prompt-template", "Review: {text}\\nSentiment:",
            "--response-template", " {label}", "--batch-size", "4", "--bottleneck-dim", "8", "--num-soft-tokens", "2",
            "--no-progress", "--max-length", "32", "--max-steps", "5", "--lr", "1e-2", "--output-dir", str(out), *extra]


def test_cli_resume_refuses_changed_data_or_preparation_and_continues_an_identical_one(tmp_path, monkeypatch, capsys):
    model = save_tiny_model(tmp_path / "model")
    rows = sentiment_rows(24, seed=1)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, 2)
    assert main(_argv(model, train, out)) == 128 + signal.SIGTERM
    monkeypatch.undo()
    capsys.readouterr()
    other_rows = write_jsonl(tmp_path / "other.jsonl", sentiment_rows(24, seed=2))
    reordered = write_jsonl(tmp_path / "reordered.jsonl", rows[::-1])
    cases = [
        ((other_rows,), (), r"--train-file content: checkpoint sha256:\w{16} \(24 rows\), this run sha256:\w{16} "
                            r"\(24 rows\)"),
        ((reordered,), (), r"--train-file content: checkpoint sha256:\w{16} \(24 rows\), this run"),
        ((train,), ("--prompt-template", "Text: {text}\\nLabel:"),
         r"--prompt-template: checkpoint 'Review: \{text\}\\nSentiment:', this run 'Text: \{text\}\\nLabel:'"),
        ((train,), ("--max-length", "24"), r"--max-length: checkpoint 32, this run 24"),
        ((train,), ("--no-eos",), r"--no-eos: checkpoint False, this run True"),
        ((train,), ("--prompt-truncation", "right"), r"--prompt-truncation: checkpoint 'left', this run 'right'"),
    ]
    import re
    for (data,), extra, message in cases:
        argv = _argv(model, data, out, "--resume", "auto", *extra)  # a repeated flag: the last one wins
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert "iapt-train: error: cannot resume" in err and "Traceback" not in err
        assert sorted(os.listdir(out)) == ["checkpoint-2", "iapt_run.json"]  # nothing written
    assert main(_argv(model, train, out, "--resume", "auto")) == 0
    assert main(_argv(model, train, tmp_path / "straight")) == 0
    resumed, straight = read_adapter(out, 32, 2)[1], read_adapter(tmp_path / "straight", 32, 2)[1]
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in resumed)

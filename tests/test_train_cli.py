"""Training IAPTModel end to end: the CLI, bi-level steps, resume, checkpointing, bf16, HF Trainer.

Tiny random Llama (d=32, 2 layers) and a BPE tokenizer trained on the fly: nothing from a hub.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from iapt_fast import IAPTConfig, IAPTModel, get_iapt_model
from iapt_fast.training.bilevel import is_rational_parameter
from iapt_fast.training.data import IAPTCollator, tokenize_records
from iapt_fast.training.evaluation import evaluate_loss
from iapt_fast.train import build_parser, main
from iapt_fast.training.trainer import TrainConfig, Trainer
from train_fixtures import initial_lrs_by_kind, make_llama, save_tiny_model, sentiment_rows, write_jsonl

PROMPT = "Review: {text}\\nSentiment:"  # as typed in a shell: \n arrives as two characters


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def examples(tok):
    rows = sentiment_rows(48, seed=7)
    return tokenize_records(tok, [(f"Review: {r['text']}\nSentiment:", " " + r["label"]) for r in rows], max_length=32)


def _iapt(tok, seed=0, **cfg):
    base = make_llama(len(tok), seed=0)
    return get_iapt_model(base, IAPTConfig(num_soft_tokens=2, bottleneck_dim=8, **cfg), seed=seed)


def _trainer(model, tok, examples, out, **kw):
    kw = {"batch_size": 8, "lr": 1e-2, "rational_lr": 1e-3, "progress": False, **kw}
    dev = examples[:16] if kw.get("bilevel") else None
    return Trainer(model, TrainConfig(output_dir=str(out), **kw), examples[16:] if dev else examples,
                   IAPTCollator.from_tokenizer(tok), dev_examples=dev)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


# ------------------------------------------------------------------------------ bi-level on IAPTModel
def test_bilevel_steps_on_iapt_model(tok, examples, tmp_path):
    model = _iapt(tok)
    tr = _trainer(model, tok, examples, tmp_path, bilevel=True, weight_decay=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    rational = {n for n in trainable if is_rational_parameter(n)}
    assert rational and rational != trainable
    assert all(n.startswith("generators.") for n in trainable)  # the backbone is frozen
    for _ in range(2):
        before = _snapshot(model)
        tr.weight_step()
        assert _changed(before, model) == trainable - rational
        before = _snapshot(model)
        tr.dev_step()
        assert _changed(before, model) == rational


def test_joint_training_reduces_loss_with_checkpointing(tok, examples, tmp_path):
    losses = {}
    params = {}
    for gc in (False, True):
        model = _iapt(tok)
        tr = _trainer(model, tok, examples, tmp_path / str(gc), max_steps=25, lr=2e-2, gradient_checkpointing=gc)
        before = evaluate_loss(model, examples, tr.collator)
        tr.train()
        losses[gc] = (before, evaluate_loss(model, examples, tr.collator))
        params[gc] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        if gc:
            assert model.base_model.is_gradient_checkpointing
    before, after = losses[False]
    assert after < 0.7 * before, losses
    # Non-reentrant checkpointing recomputes the same math: same trajectory.
    for a, b in zip(params[False], params[True]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bilevel", [False, True])
def test_resume_is_exact_on_iapt_model(tok, examples, tmp_path, bilevel):
    kw = dict(bilevel=bilevel, max_steps=6, grad_accum=2, batch_size=4, warmup_steps=1, save_every=3,
              save_total_limit=1)
    straight = _trainer(_iapt(tok), tok, examples, tmp_path / "a", **kw)
    straight.train()
    _trainer(_iapt(tok), tok, examples, tmp_path / "b", **kw).train(stop_after=4)
    resumed = _trainer(_iapt(tok, seed=99), tok, examples, tmp_path / "b", **kw)  # other init: must be overwritten
    resumed.train(resume_from="auto")
    for (n, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n
    # The checkpoint folder is also a loadable adapter.
    loaded = IAPTModel.from_pretrained(make_llama(len(tok)), tmp_path / "b" / "checkpoint-3")
    assert loaded.adapter_names == ["default"]


def test_bf16_backbone_keeps_float32_master_weights(tok, examples, tmp_path):
    base = make_llama(len(tok)).to(torch.bfloat16)
    model = get_iapt_model(base, IAPTConfig(num_soft_tokens=2, bottleneck_dim=8), seed=0)
    tr = _trainer(model, tok, examples, tmp_path, bilevel=True, precision="bf16", rational_lr=1e-6)
    rats = [p for n, p in model.named_parameters() if is_rational_parameter(n)]
    before = [p.detach().clone() for p in rats]
    loss, _ = tr.dev_step()
    assert torch.isfinite(torch.tensor(loss))
    # A 1e-6 step is below bfloat16's resolution at |x|≈1: only float32 master weights move.
    assert all(p.dtype == torch.float32 for p in rats)
    assert any(not torch.equal(a, p) for a, p in zip(before, rats))
    with pytest.raises(TypeError, match="float32"):
        Trainer(get_iapt_model(make_llama(len(tok)), IAPTConfig(bottleneck_dim=8)).to(torch.bfloat16),
                TrainConfig(output_dir=str(tmp_path)), examples, IAPTCollator.from_tokenizer(tok))


# ------------------------------------------------------------------------------ transformers.Trainer
def _hf_args(out, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, learning_rate=1e-2, report_to=[],
                             use_cpu=True, remove_unused_columns=False, logging_steps=1, disable_tqdm=True,
                             seed=0, **kw)


def test_hf_trainer_trains_and_resumes(tok, examples, tmp_path):
    from transformers import Trainer as HFTrainer

    from iapt_fast.training.hf_trainer import IAPTHFTrainer

    # The plain transformers.Trainer trains IAPTModel as is.
    model = _iapt(tok)
    before = _snapshot(model)
    out = HFTrainer(model=model, args=_hf_args(tmp_path / "plain", max_steps=2, save_strategy="no"),
                    train_dataset=examples, data_collator=IAPTCollator.from_tokenizer(tok)).train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert _changed(before, model) == {n for n, p in model.named_parameters() if p.requires_grad}

    # IAPTHFTrainer checkpoints the adapter only, and resume_from_checkpoint continues exactly.
    runs = {}
    for name, resume in (("straight", None), ("resumed", "checkpoint-2")):
        model = _iapt(tok, seed=0 if resume is None else 5)
        args = _hf_args(tmp_path / "iapt", max_steps=4, save_strategy="steps", save_steps=2)
        hf = IAPTHFTrainer(model=model, args=args, train_dataset=examples,
                           data_collator=IAPTCollator.from_tokenizer(tok))
        hf.train(resume_from_checkpoint=None if resume is None else str(tmp_path / "iapt" / resume))
        runs[name] = model
        # W_pool at 3× the LR, as iapt-train's default (IAPTPoolingLR).
        lrs = initial_lrs_by_kind(hf.optimizer, model)
        assert lrs["other"] == {args.learning_rate} and list(lrs["w_pool"]) == [pytest.approx(3 * args.learning_rate)]
    ckpt = tmp_path / "iapt" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    for (n, a), (_, b) in zip(runs["straight"].named_parameters(), runs["resumed"].named_parameters()):
        assert torch.equal(a, b), n
    loaded = IAPTModel.from_pretrained(make_llama(len(tok)), tmp_path / "iapt" / "checkpoint-4")
    trained = dict(runs["straight"].named_parameters())
    for n, p in loaded.named_parameters():
        if n.startswith("generators."):
            assert torch.equal(p, trained[n]), n


# ------------------------------------------------------------------------------ CLI
def _cli_files(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(40, seed=1))
    evals = write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(12, seed=2))
    return model_dir, train, evals


def test_cli_end_to_end(tmp_path, capsys):
    model_dir, train, evals = _cli_files(tmp_path)
    out = tmp_path / "out"
    argv = ["--model", model_dir, "--train-file", train, "--eval-file", evals, "--prompt-template", PROMPT,
            "--response-template", " {label}", "--max-steps", "6", "--batch-size", "8", "--lr", "1e-2",
            "--bilevel", "--dev-fraction", "0.2", "--bottleneck-dim", "8", "--num-soft-tokens", "2",
            "--save-every", "3", "--output-dir", str(out), "--no-progress", "--max-length", "32"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["bilevel"] and metrics["dev_examples"] == 8
    assert metrics["choices"] == [" positive", " negative"] or metrics["choices"] == [" negative", " positive"]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert (out / "checkpoint-3" / "trainer_state.pt").is_file() and (out / "history.jsonl").is_file()
    # The saved adapter reproduces the reported eval loss: what was trained is what was saved.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = IAPTModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    rows = [json.loads(line) for line in open(evals)]
    exs = tokenize_records(tok, [(f"Review: {r['text']}\nSentiment:", " " + r["label"]) for r in rows], 32)
    assert evaluate_loss(model, exs, IAPTCollator.from_tokenizer(tok)) == pytest.approx(metrics["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("case,message", [
    ("missing_field", "no field"),
    ("empty_instruction", "row 3.*'text' is empty"),
    ("missing_file", "does not exist"),
    ("unreadable", "could not read JSON"),
])
def test_cli_rejects_bad_data_before_training(tmp_path, capsys, case, message):
    model_dir, train, _ = _cli_files(tmp_path)
    rows = sentiment_rows(10)
    if case == "empty_instruction":
        rows[3]["text"] = "   "
        train = write_jsonl(tmp_path / "bad.jsonl", rows)
    elif case == "missing_file":
        train = str(tmp_path / "nope.jsonl")
    elif case == "unreadable":
        (tmp_path / "bad.jsonl").write_text('{"text": "good", "label": "positive"}\n{oops\n')
        train = str(tmp_path / "bad.jsonl")
    template = "Review: {review}" if case == "missing_field" else PROMPT
    argv = ["--model", model_dir, "--train-file", train, "--prompt-template", template,
            "--response-template", " {label}", "--output-dir", str(tmp_path / "out"), "--no-progress",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    import re
    assert re.search(message, err), err
    assert not os.path.exists(tmp_path / "out" / "metrics.json")


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"


def test_cli_options_are_the_config_fields_through_hf_argument_parser(tmp_path):
    import dataclasses

    from transformers import HfArgumentParser

    from iapt_fast.train import parse_args

    parser = build_parser()
    assert isinstance(parser, HfArgumentParser)
    helps = {a.dest: a.help for a in parser._actions}
    for cls in (IAPTConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            if f.init:
                assert helps[f.name] == f.metadata["help"], f.name
    model_dir = save_tiny_model(tmp_path / "m")
    args = parse_args(["--model", model_dir, "--train-file", "x.jsonl", "--output-dir", str(tmp_path / "o"),
                       "--rational-degrees", "4,3", "--target-layers", "0,-1", "--adam-betas", "0.8,0.9",
                       "--epochs", "2", "--no-anchor-scale", "--no-progress", "--bilevel", "--max-grad-norm", "0"])
    assert args.adapter_config == IAPTConfig(rational_degrees=(4, 3), target_layers=[0, -1], anchor_scaled=False,
                                             base_model_name_or_path=os.path.abspath(model_dir))
    assert args.train_config == TrainConfig(output_dir=str(tmp_path / "o"), adam_betas=(0.8, 0.9), num_epochs=2.0,
                                            progress=False, bilevel=True, max_grad_norm=None)


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--train-file", "x.jsonl", "--output-dir", str(tmp_path)])
    assert "not a local model folder" in capsys.readouterr().err
    model_dir = save_tiny_model(tmp_path / "m")
    with pytest.raises(SystemExit):
        main(["--model", model_dir, "--train-file", "x.jsonl", "--output-dir", str(tmp_path), "--choices", "[1]"])
    assert "--choices" in capsys.readouterr().err


@pytest.mark.parametrize("form,lr", [("anchored", 1e-2), ("paper", 3e-3)])
def test_iapt_learns_the_content_not_only_the_answer_format(tok, tmp_path, form, lr):
    # The label depends on the review's first word: only a prefix that reads the instruction can
    # beat 50 %. (Guards against a pipeline that learns the label prior and nothing else.)
    # On this tiny random model the anchored form reached 0.86 at lr 3e-3 and 1.0 at 1e-2 with W_pool
    # at the LR; with the default W_pool at 3× the LR (measured best on SmolLM2, quality-2026-12-07)
    # it reached 0.76 and 0.67 here, so the pipeline check pins the scale to 1.
    from iapt_fast.training.evaluation import score_choices

    rows, test = sentiment_rows(320, seed=7), sentiment_rows(100, seed=8)
    exs = tokenize_records(tok, [(f"Review: {r['text']}\nSentiment:", " " + r["label"]) for r in rows],
                           max_length=32, add_eos=False)
    cfg = IAPTConfig(num_soft_tokens=4, bottleneck_dim=16) if form == "anchored" else \
        IAPTConfig.paper(num_soft_tokens=4, bottleneck_dim=16)
    model = get_iapt_model(make_llama(len(tok)), cfg, seed=0)
    Trainer(model, TrainConfig(output_dir=str(tmp_path), batch_size=16, lr=lr, max_steps=100, progress=False,
                               pool_lr_scale=1.0), exs, IAPTCollator.from_tokenizer(tok)).train()
    choices = [" positive", " negative"]
    scores = score_choices(model, tok, [f"Review: {r['text']}\nSentiment:" for r in test], choices)
    gold = torch.tensor([choices.index(" " + r["label"]) for r in test])
    assert (scores.argmax(1) == gold).float().mean() > 0.9


# ------------------------------------------------------------------------------ clear CLI errors
def _no_model_load(monkeypatch):
    import transformers

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)


@pytest.mark.parametrize("where", ["is_file", "under_a_file"])
def test_cli_output_dir_that_is_a_file_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, where):
    model_dir, train, _ = _cli_files(tmp_path)
    (tmp_path / "taken").write_text("not a folder")
    out = tmp_path / "taken" if where == "is_file" else tmp_path / "taken" / "run"
    _no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main(["--model", model_dir, "--train-file", train, "--prompt-template", PROMPT, "--response-template",
              " {label}", "--output-dir", str(out), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    words = "is a file, not a folder" if where == "is_file" else f"cannot be created: '{tmp_path / 'taken'}' is a file"
    assert f"--output-dir '{out}'" in err and words in err and "Traceback" not in err, err


def test_cli_resume_auto_on_a_finished_run_without_checkpoints_says_what_is_there(tmp_path, monkeypatch, capsys):
    model_dir, train, _ = _cli_files(tmp_path)
    out = tmp_path / "out"
    argv = ["--model", model_dir, "--train-file", train, "--prompt-template", PROMPT, "--response-template",
            " {label}", "--max-steps", "2", "--batch-size", "4", "--bottleneck-dim", "8", "--num-soft-tokens", "2",
            "--output-dir", str(out), "--no-progress", "--max-length", "32"]
    assert main(argv) == 0
    capsys.readouterr()
    _no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--resume", "auto"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "found nothing to continue" in err and "metrics.json: the run finished" in err
    assert "adapter_config.json" in err and "--overwrite-output-dir" in err
    assert "resume it" not in err and "Traceback" not in err  # the user already asked to resume


def test_cli_names_the_file_and_line_of_a_byte_that_is_not_utf8(tmp_path, capsys):
    model_dir, _, _ = _cli_files(tmp_path)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "good movie", "label": "positive"}\n{"text": "bad caf\xe9", "label": "negative"}\n')
    argv = ["--model", model_dir, "--train-file", str(bad), "--prompt-template", PROMPT, "--response-template",
            " {label}", "--output-dir", str(tmp_path / "out"), "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"data file '{bad}', line 2: byte b'\\xe9'" in err and "not UTF-8" in err, err
    assert "Traceback" not in err

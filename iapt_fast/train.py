"""`python -m iapt_fast.train` / `iapt-train`: train an IAPT adapter on local data.

Example (a sentiment classifier from a CSV of reviews):

    iapt-train --model ./SmolLM2-135M-Instruct --train-file reviews.csv \\
        --prompt-template "Review: {text}\\nSentiment:" --response-template " {label}" \\
        --max-steps 150 --batch-size 8 --output-dir runs/sentiment

Everything is checked before the model is loaded: files readable, fields present, no empty
instruction or response. The adapter lands in --output-dir (``save_pretrained`` format, load
it with ``IAPTModel.from_pretrained(base_model, path)``), with ``metrics.json`` and
``history.jsonl``; ``--resume auto`` continues the latest checkpoint exactly.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from iapt_fast.atomic import atomic_write_text
from iapt_fast.config import IAPTConfig
from iapt_fast.model import VERIFIED_ATTENTION, get_iapt_model
from iapt_fast.model.architectures import SUPPORTED_FAMILIES
from iapt_fast.training.checkpoints import (ResumeRefused, TrainingInterrupted, check_output_dir, check_output_path,
                                            latest_checkpoint, read_state)
from iapt_fast.training.data import (IAPTCollator, PromptFormat, detect_choices, format_records, load_records,
                                     split_records, tokenize_records)
from iapt_fast.training.dist_context import DEFAULT_TIMEOUT_S, STRATEGIES, init_distributed, shutdown
from iapt_fast.training.evaluation import choice_examples, score_choices
from iapt_fast.training.fingerprint import records_digest, tokenizer_digest
from iapt_fast.training.parallel import prepare_model, save_adapter
from iapt_fast.training.sharded import sharded_choice_eval_fn
from iapt_fast.training.train_config import TrainConfig
from iapt_fast.training.trainer import Trainer

# All imports are eager: `import iapt_fast` already loads torch and the model code, and the CLI
# needs the rest before its first step. The one optional dependency, `datasets`, stays lazy
# inside training/data.py, imported only when a data file is read.

__all__ = ["ModelArguments", "DataArguments", "LaunchArguments", "build_parser", "main", "parse_args"]

# Every option is a field of one of these dataclasses, IAPTConfig or TrainConfig, its help text
# in the field's metadata: one definition, one recipe, whichever way a user starts.


@dataclass
class ModelArguments:
    """The backbone the adapter is trained on."""

    _argument_group_name = "model"

    model: str = field(metadata={"help": "local folder of a transformers causal LM (config.json + weights)"})
    tokenizer: str | None = field(default=None, metadata={"help": "local tokenizer folder (default: --model)"})
    device: str | None = field(default=None, metadata={
        "help": "torch device (default: cuda if available, else cpu)"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "attention kernel (default: the model's); IAPT is verified with these",
        "choices": VERIFIED_ATTENTION})


@dataclass
class DataArguments:
    """Where the examples come from and how they become token sequences."""

    _argument_group_name = "data"

    train_file: list[str] = field(metadata={"help": "JSON, JSONL, CSV/TSV or Parquet file(s)"})
    eval_file: list[str] | None = field(default=None, metadata={
        "help": "evaluation file(s) (default: --eval-fraction of train)"})
    dev_file: list[str] | None = field(default=None, metadata={
        "help": "bi-level dev file(s) for the rational coefficients (default: --dev-fraction of train)"})
    eval_fraction: float = field(default=0.0, metadata={"help": "share of train held out for evaluation"})
    dev_fraction: float = field(default=0.1, metadata={"help": "share of train held out as the bi-level dev split"})
    instruction_field: str = field(default="instruction", metadata={"help": "field holding the instruction (prompt)"})
    response_field: str = field(default="response", metadata={"help": "field holding the response (target)"})
    prompt_template: str | None = field(default=None, metadata={
        "help": 'prompt as a format string over the fields, e.g. "Review: {text}\\nSentiment:" (\\n = newline); '
                "overrides --instruction-field"})
    response_template: str | None = field(default=None, metadata={
        "help": 'response as a format string, e.g. " {label}" (lead with the separating space); '
                "overrides --response-field"})
    max_length: int = field(default=512, metadata={
        "help": "max tokens per example; the prompt is cut first, the response kept"})
    prompt_truncation: str = field(default="left", metadata={
        "help": "which end of a too-long prompt to drop", "choices": ("left", "right")})
    no_eos: bool = field(default=False, metadata={"help": "do not end responses with EOS"})
    choices: str = field(default="auto", metadata={
        "help": 'classification labels for eval accuracy: "auto" (detected from few distinct responses), '
                '"none", or a JSON list of response strings'})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder"})

    def __post_init__(self) -> None:
        for name in ("eval_fraction", "dev_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{_flag(name)} must lie in [0, 1), got {getattr(self, name)}")
        if self.max_length < 1:
            raise ValueError(f"--max-length must be a positive integer, got {self.max_length}")


@dataclass
class LaunchArguments:
    """Resuming, and the job the process belongs to."""

    _argument_group_name = "launch (resume; distributed: start with torchrun or accelerate launch)"

    resume: str | None = field(default=None, metadata={
        "help": 'checkpoint folder to resume, or "auto" for this run\'s latest in --output-dir'})
    distributed: str = field(default="auto", metadata={
        "help": "auto: DDP when launched with several processes (FSDP under an accelerate FSDP config), else one "
                "process; fsdp: FSDP2, frozen backbone and generators sharded. --batch-size is the global batch, "
                "split over the processes", "choices": STRATEGIES})
    dist_timeout: float = field(default=DEFAULT_TIMEOUT_S, metadata={
        "help": "seconds the rendezvous or any collective may wait (a dead or stuck rank) before failing"})


_OPTION_CLASSES = (ModelArguments, DataArguments, IAPTConfig, TrainConfig, LaunchArguments)


def _numbers(kind: Callable[[str], Any], count: int | None) -> Callable[[str], Any]:
    """Parser of comma-separated numbers ("6,5"): ``count`` of them as a tuple, or any number as a list."""
    def parse(text: str) -> Any:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated values, got {text!r}")
        return tuple(values) if count is not None else values
    return parse


# Field types HfArgumentParser has no parser for, and how a value of each is typed.
_VALUE_PARSERS: dict[Any, Callable[[str], Any]] = {
    tuple[int, int]: _numbers(int, 2), tuple[float, float]: _numbers(float, 2), list[int] | None: _numbers(int, None),
    str | Callable[..., Any]: str,  # a callable initialiser cannot come from a command line
}


class _OptionParser(HfArgumentParser):
    """HfArgumentParser plus the field types above, typed as comma-separated numbers ("6,5")."""

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        # A copy: HfArgumentParser rewrites the field's type while it reads it.
        field = copy.copy(field)
        field.type = _VALUE_PARSERS.get(field.type, field.type)
        if field.metadata.get("required"):
            field.default = dataclasses.MISSING  # the Python default is not the command line's
        HfArgumentParser._parse_dataclass_field(parser, field)


def build_parser() -> HfArgumentParser:
    """The ``iapt-train`` parser: one option per field of the option dataclasses."""
    return _OptionParser(
        _OPTION_CLASSES, prog="iapt-train",
        description="Train an IAPT (Instruction-Aware Prompt Tuning) adapter on a local causal LM and local data.")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flags_of(cls: type) -> dict[str, str]:
    """Field name → the flag the docs use (the first alias where there is one)."""
    out = {}
    for f in (f for f in dataclasses.fields(cls) if f.init):
        aliases = f.metadata.get("aliases")
        out[f.name] = (aliases if isinstance(aliases, str) else aliases[0]) if aliases else _flag(f.name)
    return out


def name_flags(message: str) -> str:
    """``message`` with IAPTConfig's and TrainConfig's field names replaced by their flags (for errors)."""
    for cls in (IAPTConfig, TrainConfig):
        for name, flag in _flags_of(cls).items():
            message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w])", flag, message)
    return message


def _options(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``cls`` that came from the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Every option (one attribute per field), checked, with the built ``adapter_config``
    (IAPTConfig) and ``train_config`` (TrainConfig); a bad one exits with a usage message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        DataArguments(**_options(DataArguments, args))  # its range checks
    except ValueError as err:
        parser.error(str(err))
    args.prompt_template = _unescape(args.prompt_template)
    args.response_template = _unescape(args.response_template)
    if args.choices not in ("auto", "none"):
        try:
            choices = json.loads(args.choices)
        except json.JSONDecodeError:
            choices = None
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            parser.error('--choices must be "auto", "none" or a JSON list of at least two strings')
        args.choices = choices
    if not os.path.isdir(args.model) or not os.path.isfile(os.path.join(args.model, "config.json")):
        parser.error(f"--model {args.model!r} is not a local model folder (no config.json); hub names are not fetched")
    # Everything that can be checked without loading the model is checked here, so that a
    # typo costs a usage message, not a model load and a traceback.
    try:
        args.adapter_config = _adapter_config(args)
        args.train_config = _train_config(args)
        _check_model_folder(args)
        _check_output(args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(name_flags(str(err)))
    return args


_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}


def _unescape(text: str | None) -> str | None:
    """Shells pass "\\n" literally; a template that says \\n means a newline."""
    if text is None:
        return None
    out, i = [], 0
    while i < len(text):
        pair = text[i:i + 2]
        if pair in _ESCAPES:
            out.append(_ESCAPES[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _adapter_config(args: argparse.Namespace) -> IAPTConfig:
    kwargs = _options(IAPTConfig, args)
    if kwargs["prompt_init_text"] is not None:
        kwargs["anchor_init"] = "text"
    kwargs["base_model_name_or_path"] = kwargs["base_model_name_or_path"] or os.path.abspath(args.model)
    return IAPTConfig(**kwargs)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    kwargs = _options(TrainConfig, args)
    kwargs["max_grad_norm"] = kwargs["max_grad_norm"] or None  # 0 disables clipping
    return TrainConfig(**kwargs)


def _check_model_folder(args: argparse.Namespace) -> None:
    """The model's family and depth from its config.json (no weights are read)."""
    path = os.path.join(args.model, "config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--model: {path!r} is not a readable JSON config: {err}") from err
    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"--model: model_type {family!r} is not supported; IAPT supports {list(SUPPORTED_FAMILIES)}")
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    if isinstance(layers, int):
        args.adapter_config.resolved_layers(layers)  # names target_layers (shown as --target-layers)


def _check_output(args: argparse.Namespace) -> None:
    check_output_path(args.output_dir)
    if args.resume not in (None, "auto"):
        read_state(args.resume)  # FileNotFoundError / ValueError name the file
    elif args.resume is None or latest_checkpoint(args.output_dir) is None:
        check_output_dir(args.output_dir, args.overwrite_output_dir, resume_auto=args.resume == "auto")


def _prepare_data(args: argparse.Namespace, tokenizer) -> dict[str, Any]:
    """Load, validate and tokenize every split; all data errors surface here, before the model loads."""
    fmt = PromptFormat(args.instruction_field, args.response_field, args.prompt_template, args.response_template)
    digests: dict[str, str] = {}

    def read(paths: list[str], flag: str | None = None) -> list[tuple[str, str]]:
        records = load_records(paths, cache_dir=args.cache_dir)
        if flag is not None:
            digests[f"{flag} content"] = records_digest(records)
        return format_records(records, fmt, source=", ".join(paths))

    train = read(args.train_file, "--train-file")
    evals = read(args.eval_file) if args.eval_file else None
    dev = read(args.dev_file, "--dev-file") if args.dev_file else None
    if evals is None and args.eval_fraction > 0:
        train, evals = split_records(train, args.eval_fraction, args.seed)
    if args.bilevel and dev is None:
        if args.dev_fraction <= 0:
            raise ValueError("--bilevel needs a dev split: give --dev-file or a --dev-fraction > 0")
        train, dev = split_records(train, args.dev_fraction, args.seed + 1)

    def tok(pairs):
        return tokenize_records(tokenizer, pairs, args.max_length, add_eos=not args.no_eos,
                                prompt_truncation=args.prompt_truncation)

    if args.choices == "auto":
        choices = detect_choices([r for _, r in train])
    elif args.choices == "none":
        choices = None
    else:
        choices = args.choices
    return {
        "train": tok(train), "eval": tok(evals) if evals else None, "dev": tok(dev) if dev else None,
        "eval_pairs": evals, "choices": choices, "fingerprint": _data_fingerprint(args, tokenizer, digests),
    }


def _data_fingerprint(args: argparse.Namespace, tokenizer, digests: dict[str, str]) -> dict[str, Any]:
    """Every option that decides the training batches, by its flag (a resume must match them)."""
    splits_train = args.eval_file is None and args.eval_fraction > 0
    splits_dev = args.bilevel and args.dev_file is None
    return {
        **digests,
        # A template replaces the field of its side: only the one in use counts.
        "--instruction-field": args.instruction_field if args.prompt_template is None else None,
        "--response-field": args.response_field if args.response_template is None else None,
        "--prompt-template": args.prompt_template, "--response-template": args.response_template,
        "--max-length": args.max_length, "--prompt-truncation": args.prompt_truncation, "--no-eos": args.no_eos,
        "--eval-fraction": args.eval_fraction if splits_train else None,
        "--dev-fraction": args.dev_fraction if splits_dev else None,
        "tokenizer": tokenizer_digest(tokenizer),
    }


def _choice_eval_fn(tokenizer, pairs, choices, batch_size: int, max_length: int):
    prompts, gold = choice_examples(pairs, choices)
    if not prompts:
        return None

    def fn(model) -> dict[str, float]:
        scores = score_choices(model, tokenizer, prompts, choices, batch_size=batch_size, max_length=max_length)
        acc = (scores.argmax(1) == torch.tensor(gold)).float().mean().item()
        return {"accuracy": acc}

    return fn


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``iapt-train``; returns the process exit status.

    Under ``torchrun`` / ``accelerate launch`` every process runs this; see docs/distributed.md.
    """
    args = parse_args(argv)
    try:
        ctx = init_distributed(args.distributed, args.dist_timeout, device=args.device)
    except (RuntimeError, ValueError) as err:
        print(f"iapt-train: error: {err}", file=sys.stderr)
        return 2
    try:
        return _run(args, ctx)
    finally:
        shutdown(ctx)


def _run(args: argparse.Namespace, ctx) -> int:
    """Data, model, training, then the adapter, history and metrics in --output-dir."""
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    try:
        data = _prepare_data(args, tokenizer)
    except (ValueError, FileNotFoundError) as err:
        print(f"iapt-train: error: {err}", file=sys.stderr)
        return 2
    cfg = args.train_config
    torch.manual_seed(args.seed)
    # FSDP: loaded on the CPU, each layer reaches the GPU only as its shard (prepare_model).
    load_device = torch.device("cpu") if ctx.strategy == "fsdp" else ctx.device
    model = load_iapt_model(args.model, args.adapter_config, args.precision, load_device, args.attn_implementation,
                            args.seed, tokenizer=tokenizer)
    model = prepare_model(model, ctx)  # FSDP shards here, before the optimizer exists
    eval_fn = _eval_fn(args, ctx, tokenizer, data)
    trainer = Trainer(model, cfg, data["train"], IAPTCollator.from_tokenizer(tokenizer, padding_side="right"),
                      eval_examples=data["eval"], dev_examples=data["dev"], eval_fn=eval_fn, ctx=ctx,
                      data_fingerprint=data["fingerprint"])
    if cfg.eval_every is None and data["eval"]:
        cfg.eval_every = trainer.max_steps  # evaluate once, at the end
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from=args.resume)
    except ResumeRefused as err:
        if ctx.is_main:
            print(f"iapt-train: error: {name_flags(str(err))}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        # The conventional exit status of a process ended by a signal: schedulers see a
        # preempted job, not a finished one.
        if ctx.is_main:
            print(f"iapt-train: {stop}", file=sys.stderr)
        return 128 + stop.signum
    _write_outputs(args, ctx, model, trainer, data, eval_fn, time.perf_counter() - t0)
    return 0


def _eval_fn(args: argparse.Namespace, ctx, tokenizer, data: dict[str, Any]):
    """Choice accuracy on the eval split (sharded over the ranks), or None."""
    if not (data["choices"] and data["eval_pairs"]):
        return None
    if ctx.enabled:
        return sharded_choice_eval_fn(tokenizer, data["eval_pairs"], data["choices"],
                                      max(1, args.eval_batch_size // ctx.world_size), args.max_length, ctx)
    return _choice_eval_fn(tokenizer, data["eval_pairs"], data["choices"], args.eval_batch_size, args.max_length)


def _write_outputs(args: argparse.Namespace, ctx, model, trainer, data: dict[str, Any], eval_fn, elapsed: float) -> None:
    """The adapter (gathered; rank 0 writes), history.jsonl and metrics.json, each by rename."""
    os.makedirs(args.output_dir, exist_ok=True)
    save_adapter(model, args.output_dir, ctx)
    trainer.save_history()
    final = trainer.evaluate() if (data["eval"] or eval_fn) else {}
    metrics = {
        "steps": trainer.step, "train_seconds": elapsed, "bilevel": args.bilevel,
        "train_examples": len(data["train"]), "dev_examples": len(data["dev"] or []),
        "eval_examples": len(data["eval"] or []), "choices": data["choices"],
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "final_train_loss": next((h["loss"] for h in reversed(trainer.history) if "loss" in h), None),
        **final,
    }
    if not ctx.is_main:
        return
    metrics["world_size"], metrics["distributed"] = ctx.world_size, ctx.strategy
    atomic_write_text(os.path.join(args.output_dir, "metrics.json"), json.dumps(metrics, indent=2))
    print(json.dumps(metrics))


def load_iapt_model(path: str, adapter_config, precision: str, device, attn_implementation: str | None = None,
                    seed: int | None = None, tokenizer: Any | None = None):
    """Backbone from a local folder (in the precision's dtype), wrapped with a fresh float32 adapter
    (``tokenizer``: for an anchor started from ``prompt_init_text``)."""
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if precision == "bf16" else torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model = get_iapt_model(base, adapter_config, seed=seed, tokenizer=tokenizer)
    # The backbone may be bf16; the trained weights stay float32 master weights (trainer.py).
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model.to(device)


if __name__ == "__main__":
    sys.exit(main())

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
import json
import os
import sys
import time
from typing import Any, Sequence

from iapt_fast.cli_fields import add_dataclass_arguments, dataclass_kwargs, name_flags
from iapt_fast.config import IAPTConfig

__all__ = ["build_parser", "main", "parse_args"]

# The adapter and optimisation options are IAPTConfig's and TrainConfig's fields (cli_fields.py):
# one definition, one recipe, whichever way a user starts.

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


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from iapt_fast.model.iapt_model import VERIFIED_ATTENTION

    p = argparse.ArgumentParser(
        prog="iapt-train",
        description="Train an IAPT (Instruction-Aware Prompt Tuning) adapter on a local causal LM and local data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="local folder of a transformers causal LM (config.json + weights)")
    g.add_argument("--tokenizer", default=None, help="local tokenizer folder (default: --model)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--attn-implementation", choices=VERIFIED_ATTENTION, default=None,
                   help="attention kernel (default: the model's); IAPT is verified with these")

    g = p.add_argument_group("data")
    g.add_argument("--train-file", nargs="+", required=True, help="JSON, JSONL, CSV/TSV or Parquet file(s)")
    g.add_argument("--eval-file", nargs="+", default=None, help="evaluation file(s) (default: --eval-fraction of train)")
    g.add_argument("--dev-file", nargs="+", default=None,
                   help="bi-level dev file(s) for the rational coefficients (default: --dev-fraction of train)")
    g.add_argument("--eval-fraction", type=_fraction, default=0.0, help="share of train held out for evaluation")
    g.add_argument("--dev-fraction", type=_fraction, default=0.1, help="share of train held out as the bi-level dev split")
    g.add_argument("--instruction-field", default="instruction", help="field holding the instruction (prompt)")
    g.add_argument("--response-field", default="response", help="field holding the response (target)")
    g.add_argument("--prompt-template", default=None,
                   help='prompt as a format string over the fields, e.g. "Review: {text}\\nSentiment:" (\\n = newline); '
                        "overrides --instruction-field")
    g.add_argument("--response-template", default=None,
                   help='response as a format string, e.g. " {label}" (lead with the separating space); '
                        "overrides --response-field")
    g.add_argument("--max-length", type=_positive_int, default=512,
                   help="max tokens per example; the prompt is cut first, the response kept")
    g.add_argument("--prompt-truncation", choices=("left", "right"), default="left",
                   help="which end of a too-long prompt to drop")
    g.add_argument("--no-eos", action="store_true", help="do not end responses with EOS")
    g.add_argument("--choices", default="auto",
                   help='classification labels for eval accuracy: "auto" (detected from few distinct responses), '
                        '"none", or a JSON list of response strings')
    g.add_argument("--cache-dir", default=None, help="datasets cache folder")

    from iapt_fast.training.trainer import TrainConfig

    adapter = p.add_argument_group("adapter (IAPTConfig)")
    add_dataclass_arguments(p, IAPTConfig, default_group=adapter)
    optimisation = p.add_argument_group("optimisation (TrainConfig)")
    output = p.add_argument_group("output")
    add_dataclass_arguments(p, TrainConfig, groups={"model": model, "output": output}, default_group=optimisation)
    output.add_argument("--resume", default=None,
                        help='checkpoint folder to resume, or "auto" for this run\'s latest in --output-dir')

    from iapt_fast.training.distributed import add_distributed_arguments  # torchrun / accelerate launch
    add_distributed_arguments(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        from iapt_fast.training.trainer import TrainConfig
        parser.error(name_flags(str(err), IAPTConfig, TrainConfig))
    return args


def _adapter_config(args: argparse.Namespace) -> IAPTConfig:
    kwargs = dataclass_kwargs(IAPTConfig, args)
    if kwargs["prompt_init_text"] is not None:
        kwargs["anchor_init"] = "text"
    return IAPTConfig(**kwargs, base_model_name_or_path=os.path.abspath(args.model))


def _train_config(args: argparse.Namespace):
    from iapt_fast.training.trainer import TrainConfig

    kwargs = dataclass_kwargs(TrainConfig, args)
    kwargs["max_grad_norm"] = kwargs["max_grad_norm"] or None  # 0 disables clipping
    return TrainConfig(**kwargs)


def _check_model_folder(args: argparse.Namespace) -> None:
    """The model's family and depth from its config.json (no weights are read)."""
    from iapt_fast.model.architectures import SUPPORTED_FAMILIES

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
    from iapt_fast.training.checkpoints import check_output_dir, latest_checkpoint, read_state

    if args.resume not in (None, "auto"):
        read_state(args.resume)  # FileNotFoundError / ValueError name the file
    elif args.resume is None or latest_checkpoint(args.output_dir) is None:
        check_output_dir(args.output_dir, args.overwrite_output_dir)


def _prepare_data(args: argparse.Namespace, tokenizer) -> dict[str, Any]:
    """Load, validate and tokenize every split; all data errors surface here, before the model loads."""
    from iapt_fast.training.data import PromptFormat, detect_choices, format_records, load_records, split_records, tokenize_records

    fmt = PromptFormat(args.instruction_field, args.response_field, args.prompt_template, args.response_template)

    def read(paths: list[str]) -> list[tuple[str, str]]:
        return format_records(load_records(paths, cache_dir=args.cache_dir), fmt, source=", ".join(paths))

    train = read(args.train_file)
    evals = read(args.eval_file) if args.eval_file else None
    dev = read(args.dev_file) if args.dev_file else None
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
        "eval_pairs": evals, "choices": choices,
    }


def _choice_eval_fn(tokenizer, pairs, choices, batch_size: int, max_length: int):
    from iapt_fast.training.evaluation import choice_examples, score_choices

    prompts, gold = choice_examples(pairs, choices)
    if not prompts:
        return None

    def fn(model) -> dict[str, float]:
        import torch
        scores = score_choices(model, tokenizer, prompts, choices, batch_size=batch_size, max_length=max_length)
        acc = (scores.argmax(1) == torch.tensor(gold)).float().mean().item()
        return {"accuracy": acc}

    return fn


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``iapt-train``; returns the process exit status.

    Under ``torchrun`` / ``accelerate launch`` every process runs this; see docs/distributed.md.
    """
    args = parse_args(argv)
    from iapt_fast.training.distributed import init_distributed, shutdown

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
    import torch
    from transformers import AutoTokenizer

    from iapt_fast.training.checkpoints import TrainingInterrupted
    from iapt_fast.training.data import IAPTCollator
    from iapt_fast.training.distributed import make_trainer, prepare_model

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
    trainer = make_trainer(model, cfg, data["train"], IAPTCollator.from_tokenizer(tokenizer, padding_side="right"), ctx,
                           eval_examples=data["eval"], dev_examples=data["dev"], eval_fn=eval_fn)
    if cfg.eval_every is None and data["eval"]:
        cfg.eval_every = trainer.max_steps  # evaluate once, at the end
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from=args.resume)
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
    from iapt_fast.training.distributed import sharded_choice_eval_fn

    if not (data["choices"] and data["eval_pairs"]):
        return None
    if ctx.enabled:
        return sharded_choice_eval_fn(tokenizer, data["eval_pairs"], data["choices"],
                                      max(1, args.eval_batch_size // ctx.world_size), args.max_length, ctx)
    return _choice_eval_fn(tokenizer, data["eval_pairs"], data["choices"], args.eval_batch_size, args.max_length)


def _write_outputs(args: argparse.Namespace, ctx, model, trainer, data: dict[str, Any], eval_fn, elapsed: float) -> None:
    """The adapter (gathered; rank 0 writes), history.jsonl and metrics.json, each by rename."""
    from iapt_fast.atomic import atomic_write_text
    from iapt_fast.training.distributed import save_adapter

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
    import torch
    from transformers import AutoModelForCausalLM

    from iapt_fast import get_iapt_model

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

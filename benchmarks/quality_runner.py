"""Running the quality report: train and score each (method, LR, seed) once, kept on disk as it
ends (<out>/runs/<key>.json, trained parameters in runs/work/), the LR sweep chosen on dev, and
the report's numbers collected from the finished runs. Also: exporting a task for iapt-train,
scoring a saved adapter, and the diagnostics of the IAPT forms.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from quality_generate import generative_score, mean_interval
from quality_methods import DEFAULT_LR, METHOD_LABELS, METHODS, RUN_RECIPE, TRAIN_OVERRIDES, build_method, count_trainable
from quality_report import write_outputs
from quality_tasks import (TASKS, GenTask, Task, find_task, load_splits, load_task, prepare_smollm2,
                                      synthetic_setup)
from iapt_fast.atomic import atomic_write_text

__all__ = ["RunContext", "run", "run_one", "collect", "choose_lr", "export_task", "score_adapter", "diagnose"]


@dataclass(frozen=True)
class RunContext:
    """What every run of one report shares: its settings, task, data and model factory.

    Attributes:
        args: the report's settings (quality.parse_args).
        load_base: () -> a fresh backbone (eval mode, frozen by build_method).
        splits: "train" / "dev" / "test" → (text, answer) rows.
    """

    args: argparse.Namespace
    task: Task | GenTask
    load_base: Callable[[], torch.nn.Module]
    tokenizer: Any
    splits: dict[str, list]


def accuracy(model, tokenizer, data: list, args, task: Task, desc: str) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from iapt_fast.training.evaluation import score_choices, wilson_interval

    prompts = [task.prompt.format(text=t) for t, _ in data]
    gold = torch.tensor([task.choices.index(lab) for _, lab in data])
    t0 = time.perf_counter()
    with tqdm(total=len(prompts), desc=desc, leave=False, disable=not args.progress) as bar:
        scores = score_choices(model, tokenizer, prompts, list(task.choices), batch_size=args.eval_batch_size,
                               progress=bar)
    pred = scores.argmax(1)
    correct = int((pred == gold).sum())
    lo, hi = wilson_interval(correct, len(data))
    return {"accuracy": correct / len(data), "ci95": [lo, hi], "n": len(data), "correct": correct,
            "predicted_second_choice": float(pred.float().mean()), "eval_seconds": time.perf_counter() - t0}


def evaluate(model, tokenizer, data: list, args, task: Task | GenTask, desc: str) -> dict[str, Any]:
    """Test/dev score of one model: choice accuracy, or greedy generation for a GenTask."""
    if not isinstance(task, GenTask):
        return accuracy(model, tokenizer, data, args, task, desc)
    from tqdm.auto import tqdm

    with tqdm(total=len(data), desc=desc, leave=False, disable=not args.progress) as bar:
        return generative_score(model, tokenizer, data, task.prompt, task.max_new_tokens, args.eval_batch_size, bar)


def train_method(model, tokenizer, splits, args, task: Task, lr: float, seed: int, out_dir: str, method: str = ""):
    from iapt_fast.training.data import IAPTCollator, tokenize_records
    from iapt_fast.training.trainer import TrainConfig, Trainer

    pairs = [(task.prompt.format(text=t), lab) for t, lab in splits["train"]]
    overrides = {**RUN_RECIPE, **TRAIN_OVERRIDES.get(method, {})}
    cfg = TrainConfig(output_dir=out_dir, max_steps=args.steps, batch_size=args.batch_size, lr=lr,
                      warmup_ratio=0.1, seed=seed, progress=args.progress, save_every=None,
                      overwrite_output_dir=True, **overrides)  # runs/work/<key>: this report's own scratch folder
    # A generated answer must end: generative tasks learn EOS after it.
    examples = tokenize_records(tokenizer, pairs, args.max_length, add_eos=isinstance(task, GenTask))
    dev = None
    if cfg.bilevel:  # the rationals' held-out split comes from train (dev and test stay untouched)
        cut = len(examples) - max(1, len(examples) // 10)
        examples, dev = examples[:cut], examples[cut:]
    trainer = Trainer(model, cfg, examples, IAPTCollator.from_tokenizer(tokenizer), dev_examples=dev)
    torch.manual_seed(seed)
    return trainer.train()


def run_key(method: str, lr: float | None, seed: int) -> str:
    return method if lr is None else f"{method}-lr{lr:g}-s{seed}"


def load_trained(model: torch.nn.Module, path: str) -> None:
    """Put a run's saved trainable parameters (runs/work/<key>/trained.pt) into a fresh model."""
    unexpected = model.load_state_dict(torch.load(path), strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"{path}: parameters {unexpected[:3]} do not exist in this method's model")


def run_one(method: str, lr: float | None, seed: int, ctx: RunContext, dev: bool, test: bool) -> dict[str, Any]:
    """Train (unless zero-shot) and score one (method, lr, seed) on dev and/or test.

    Cached in <out>/runs/<key>.json; the trained parameters are kept in <out>/runs/work/, so a
    later call that wants a score the run does not have yet (the sweep's winner on test)
    rebuilds the model from them instead of training again.
    """
    args, task = ctx.args, ctx.task
    key = run_key(method, lr, seed)
    path = os.path.join(args.out, "runs", key + ".json")
    entry: dict[str, Any] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            entry = json.load(fh)
        if (not dev or "dev" in entry) and (not test or "test" in entry):
            return entry
    work = os.path.join(args.out, "runs", "work", key)
    state_path = os.path.join(work, "trained.pt")
    model = build_method(method, ctx.load_base, args, ctx.tokenizer, task, seed)
    if lr is not None and os.path.isfile(state_path):
        load_trained(model, state_path)
    elif lr is not None:
        print(f"== {key}", flush=True)
        entry = {"method": method, "lr": lr, "seed": seed, "steps": args.steps,
                 "trainable_parameters": count_trainable(model)}
        t0 = time.perf_counter()
        history = train_method(model, ctx.tokenizer, ctx.splits, args, task, lr, seed, work, method)
        entry["train_seconds"] = time.perf_counter() - t0
        entry["seconds_per_step"] = statistics.median(h["time"] for h in history if "time" in h)
        entry["curve"] = [[h["step"], h["loss"]] for h in history if "loss" in h]
        os.makedirs(work, exist_ok=True)
        torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, state_path)
    else:
        entry = {"method": method, "lr": None, "seed": seed, "steps": 0, "trainable_parameters": 0}
    if dev and "dev" not in entry:
        entry["dev"] = evaluate(model, ctx.tokenizer, ctx.splits["dev"][: args.tune_examples], args, task,
                                f"dev {key}")
        print(f"   {key} dev {entry['dev']['accuracy']:.4f}", flush=True)
    if test and "test" not in entry:
        entry["test"] = evaluate(model, ctx.tokenizer, ctx.splits["test"], args, task, f"test {key}")
        t = entry["test"]
        print(f"   {key} test {t['accuracy']:.4f} [{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}]", flush=True)
    atomic_write_text(path, json.dumps(entry, indent=2))  # a run is either complete on disk or absent
    return entry


def method_grid(method: str, args) -> list[float]:
    if method in args.lrs:
        return [args.lrs[method]]
    if args.tune:
        return [DEFAULT_LR[method] * f for f in args.tune_factors]
    return [DEFAULT_LR[method]]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    task = find_task(args.task)
    if args.synthetic:
        load_base, tokenizer, splits = synthetic_setup(task, args.seed, 400, args.n_dev, args.n_test)
        args.tokenizer_path = None
        model_name = "tiny random Llama (synthetic)"
    else:
        path = prepare_smollm2(args.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(path)
        args.tokenizer_path = path

        def load_base():
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        splits = load_splits(task, args, tokenizer)
        model_name = "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)"
    print(f"{task.name}: train {len(splits['train'])}, dev {len(splits['dev'])}, test {len(splits['test'])}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    ctx = RunContext(args=args, task=task, load_base=load_base, tokenizer=tokenizer, splits=splits)
    meta = {"model": model_name, "task": task.description, "task_name": task.name, "prompt": task.prompt,
            "choices": list(getattr(task, "choices", ())), "kind": getattr(task, "kind", "classification"),
            "splits": {k: len(v) for k, v in splits.items()},
            "settings": {k: v for k, v in vars(args).items() if k not in ("progress", "report_only")},
            "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                        "device": "cpu"},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(os.path.join(args.out, "meta.json"), json.dumps(meta, indent=2))  # the latest settings
    if not args.report_only:
        for method in args.methods:
            if method == "zero_shot":
                run_one(method, None, args.seeds[0], ctx, dev=bool(splits["dev"]), test=True)
                continue
            grid = method_grid(method, args)
            if len(grid) > 1:  # the sweep: dev only; the winner is scored on test afterwards
                dev = {lr: run_one(method, lr, args.seeds[0], ctx, dev=True, test=False)["dev"]["accuracy"]
                       for lr in grid}
                best = choose_lr(dev, DEFAULT_LR[method])
            else:
                best = grid[0]
            for seed in args.seeds:
                run_one(method, best, seed, ctx, dev=args.dev_too and bool(splits["dev"]), test=True)
            write_outputs(collect(args, meta), args.out)  # partial results survive an interrupted run
    results = collect(args, meta)
    write_outputs(results, args.out)
    return results


def choose_lr(dev: dict[float, float], default: float) -> float:
    """Best dev accuracy; ties go to the LR nearest the method's default."""
    return max(dev, key=lambda v: (dev[v], -abs(math.log(v / default))))


def collect(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """The report's numbers from every finished run in <out>/runs/ (of the methods asked for)."""
    from iapt_fast.training.evaluation import wilson_interval

    runs_dir = os.path.join(args.out, "runs")
    runs = []
    if os.path.isdir(runs_dir):
        for name in sorted(os.listdir(runs_dir)):
            if name.endswith(".json"):
                with open(os.path.join(runs_dir, name), encoding="utf-8") as fh:
                    runs.append(json.load(fh))
    results = dict(meta, methods={}, tuning={})
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        if method == "zero_shot":
            chosen, finals = None, [r for r in mine if "test" in r][:1]
        else:
            sweep = {r["lr"]: r["dev"]["accuracy"] for r in mine if r["seed"] == args.seeds[0] and "dev" in r}
            lrs = {r["lr"] for r in mine}
            if len(sweep) > 1:
                chosen = choose_lr(sweep, DEFAULT_LR[method])
            elif len(lrs) == 1:  # a fixed LR (--lrs): no sweep
                chosen = next(iter(lrs))
            else:  # runs at several LRs but the sweep is not finished: nothing to report yet
                continue
            finals = sorted((r for r in mine if r["lr"] == chosen and "test" in r), key=lambda r: r["seed"])
            if len(sweep) > 1:
                results["tuning"][method] = {"grid": sorted(sweep), "dev_accuracy": [sweep[lr] for lr in sorted(sweep)],
                                             "chosen": chosen,
                                             "dev_examples": next(r["dev"]["n"] for r in mine if "dev" in r)}
        if not finals:
            continue
        accs = [r["test"]["accuracy"] for r in finals]
        correct, total = sum(r["test"]["correct"] for r in finals), sum(r["test"]["n"] for r in finals)
        results["methods"][method] = {
            "label": METHOD_LABELS[method], "lr": chosen, "seeds": [r["seed"] for r in finals],
            "test_accuracy": accs, "mean": statistics.mean(accs), "ci95_pooled": list(wilson_interval(correct, total)),
            "trainable_parameters": finals[0]["trainable_parameters"], "steps": finals[0]["steps"],
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in finals) if chosen else None,
            "curves": {r["seed"]: r["curve"] for r in finals if r.get("curve")},
            "predicted_second_choice": [r["test"].get("predicted_second_choice") for r in finals],
        }
        if all("f1_scores" in r["test"] for r in finals):  # generative: softer scores, seeds pooled per example
            for score in ("f1", "chrf"):
                pooled = [v for r in finals for v in r["test"][f"{score}_scores"]]
                results["methods"][method].update({score: [r["test"][score] for r in finals],
                                                   f"{score}_mean": statistics.fmean(pooled),
                                                   f"{score}_ci95_pooled": list(mean_interval(pooled))})
    return results


def export_task(args: argparse.Namespace) -> None:
    """Write the task's splits as JSONL with ``instruction`` / ``response`` fields: what
    ``iapt-train --train-file`` reads with no template flags."""
    from transformers import AutoTokenizer

    task = find_task(args.task)
    tokenizer = AutoTokenizer.from_pretrained(prepare_smollm2(args.cache_dir))
    splits = load_splits(task, args, tokenizer)
    for name, rows in splits.items():
        atomic_write_text(os.path.join(args.export, f"{task.name}-{name}.jsonl"), "".join(
            json.dumps({"instruction": task.prompt.format(text=text), "response": answer}) + "\n"
            for text, answer in rows))
    print(f"wrote {', '.join(f'{k}: {len(v)}' for k, v in splits.items())} to {args.export}")


def score_adapter(args: argparse.Namespace) -> dict[str, Any]:
    """Test accuracy of a saved IAPT adapter (e.g. from iapt-train) with this report's scorer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from iapt_fast import IAPTModel

    torch.set_num_threads(args.threads)
    task = find_task(args.task)
    path = prepare_smollm2(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = load_splits(task, args, tokenizer)
    model = IAPTModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                                      args.score_adapter)
    result = {"adapter": os.path.abspath(args.score_adapter), "task": task.name,
              "config": model.peft_config["default"].to_dict(),
              "test": evaluate(model, tokenizer, splits["test"], args, task, "test adapter")}
    atomic_write_text(os.path.join(args.out, "scored_adapter.json"), json.dumps(result, indent=2))
    t = result["test"]
    print(f"{args.score_adapter}: test accuracy {t['accuracy']:.4f} [{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}]")
    return result


@torch.no_grad()
def effective_pooled_tokens(model, base, hidden: tuple, instruction: "torch.Tensor") -> dict[int, float]:
    """Per layer: how many instruction tokens the generator's pooling softmax spreads over,
    exp(entropy), averaged over soft tokens and rows (1 = one token, n = uniform)."""
    from iapt_fast.generator.reference import masked_softmax

    cfg = model.peft_config["default"]
    out = {}
    for index in model.generators["default"].layer_indices:
        gen = model.generators["default"][index]
        source = hidden[index] if cfg.pool_input == "hidden" else base.model.layers[index].input_layernorm(hidden[index])
        attn = masked_softmax(source @ gen.w_down @ gen.w_pool, instruction[:, :, None], dim=1)
        entropy = -(attn.clamp_min(1e-30).log() * attn).sum(1)
        out[index] = round(float(entropy.exp().mean()), 2)
    return out


def diagnose(args: argparse.Namespace) -> dict[str, Any]:
    """Where each IAPT form starts, and what its generators pool: the residual-stream scale per
    layer, the response loss of the untrained model per form next to the base model's, and the
    pooling weights' effective number of tokens (exp of their entropy) per layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from iapt_fast import IAPTConfig, get_iapt_model
    from iapt_fast.training.data import IAPTCollator, tokenize_records
    from iapt_fast.training.evaluation import evaluate_loss

    torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    path = prepare_smollm2(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = load_task(task, args.n_test, args.n_dev, args.seed, args.max_text_tokens, tokenizer)
    rows = splits["dev"][: args.diag_examples]
    exs = tokenize_records(tokenizer, [(task.prompt.format(text=t), lab) for t, lab in rows], args.max_length,
                           add_eos=False)
    collator = IAPTCollator.from_tokenizer(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out: dict[str, Any] = {"task": task.name, "examples": len(exs), "layers": {}, "init_loss": {}, "pooling": {}}
    batch = collator(exs[:16])
    with torch.no_grad():
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    for index, layer in enumerate(base.model.layers):
        h = hidden[index][real]
        with torch.no_grad():
            normed = layer.input_layernorm(hidden[index])[real]
        rms, nrms = h.pow(2).mean(-1).sqrt(), normed.pow(2).mean(-1).sqrt()
        out["layers"][index] = {"rms_median": float(rms.median()), "rms_max": float(rms.max()),
                                "abs_max": float(h.abs().max()), "normed_rms_median": float(nrms.median())}
    out["init_loss"]["base"] = evaluate_loss(base, exs, collator, args.eval_batch_size)
    print(f"base model response loss {out['init_loss']['base']:.3f}", flush=True)
    forms = {
        "paper (hidden, W_up 0.02)": IAPTConfig.paper(num_soft_tokens=args.num_soft_tokens),
        "anchored bos, normed (defaults)": IAPTConfig(num_soft_tokens=args.num_soft_tokens),
        "anchored text, normed": IAPTConfig(num_soft_tokens=args.num_soft_tokens, anchor_init="text",
                                            prompt_init_text=task.init_text),
        "anchored bos, hidden": IAPTConfig(num_soft_tokens=args.num_soft_tokens, pool_input="hidden"),
    }
    for key, cfg in forms.items():
        model = get_iapt_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), cfg,
                               seed=args.seed, tokenizer=tokenizer)
        out["init_loss"][key] = evaluate_loss(model, exs, collator, args.eval_batch_size)
        print(f"untrained IAPT {key}: response loss {out['init_loss'][key]:.3f}", flush=True)
        out["pooling"][key] = effective_pooled_tokens(model, base, hidden, batch["instruction_mask"].bool())
    # The same for every trained IAPT run of this report (its saved parameters in runs/work/).
    work = os.path.join(args.out, "runs", "work")
    for run in sorted(os.listdir(work)) if os.path.isdir(work) else []:
        state = os.path.join(work, run, "trained.pt")
        method = run.split("-lr")[0]
        if not (method.startswith("iapt") and os.path.isfile(state)):
            continue
        model = build_method(method, lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                             args, tokenizer, task, 0)
        load_trained(model, state)
        out["pooling"][f"trained {run}"] = effective_pooled_tokens(model, base, hidden, batch["instruction_mask"].bool())
        print(f"pooling of trained {run}: {out['pooling'][f'trained {run}']}", flush=True)
    atomic_write_text(os.path.join(args.out, "diagnostics.json"), json.dumps(out, indent=2))
    return out

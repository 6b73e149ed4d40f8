#!/usr/bin/env python
"""Summary table of the generative tasks of a quality report folder.

    python benchmarks/quality_gen_summary.py benchmarks/results/quality-2026-12-07

Reads <folder>/<task>/results.json of every generative task (written by quality.py, also with
--report-only) and writes <folder>/generative_summary.md: per task and method, exact match
(mean over seeds, each seed, pooled Wilson 95 % interval), token F1 and chrF (pooled mean,
each seed, normal 95 % interval), each method's gap to LoRA in points of exact match, and its
token-F1 difference to LoRA paired per test example (same seeds only; normal 95 % interval).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys

from iapt_fast.atomic import atomic_write_text


def paired_f1_difference(folder: str, method: str, lrs: dict[str, float], lora: str = "lora"
                         ) -> tuple[float, float, float] | None:
    """Mean per-example token-F1 difference ``method`` − LoRA, each at its reported LR (``lrs``),
    over the seeds both ran (same test examples in the same order), with its normal 95 %
    interval; None without a common seed."""
    runs: dict[tuple[str, int], list[float]] = {}
    for name in os.listdir(os.path.join(folder, "runs")):
        if name.endswith(".json"):
            with open(os.path.join(folder, "runs", name), encoding="utf-8") as fh:
                run = json.load(fh)
            if "f1_scores" in run.get("test", {}) and run["method"] in lrs and run["lr"] == lrs[run["method"]]:
                runs[(run["method"], run["seed"])] = run["test"]["f1_scores"]
    diffs = []
    for (m, seed), scores in runs.items():
        if m == method and (lora, seed) in runs:
            diffs += [a - b for a, b in zip(scores, runs[(lora, seed)])]
    if len(diffs) < 2:
        return None
    mean, half = statistics.fmean(diffs), 1.959963984540054 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def _fmt(mean: float, per_seed: list[float], ci: list[float]) -> str:
    return f"**{mean:.3f}** ({', '.join(f'{v:.3f}' for v in per_seed)}) [{ci[0]:.3f}, {ci[1]:.3f}]"


def summary(folder: str) -> str:
    """The Markdown table of every generative task under ``folder`` (also written to a file)."""
    lines = []
    for task in sorted(os.listdir(folder)):
        path = os.path.join(folder, task, "results.json")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as fh:
            res = json.load(fh)
        methods = {m: e for m, e in res["methods"].items() if "f1_mean" in e}
        if not methods:
            continue
        lora = methods.get("lora")
        lines += [f"### {task} — {res['task']}", "",
                  f"Test {res['splits']['test']} examples, train {res['splits']['train']}; seeds per method as listed.", "",
                  "| method | seeds | exact match | token F1 | chrF | EM gap to LoRA (points) | "
                  "F1 − LoRA, paired | trainable params |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, e in methods.items():
            gap = "—" if lora is None or name == "lora" else f"{100 * (e['mean'] - lora['mean']):+.1f}"
            paired = None if name == "lora" or lora is None else paired_f1_difference(
                os.path.join(folder, task), name, {name: e["lr"], "lora": lora["lr"]})
            paired_cell = "—" if paired is None else f"{paired[0]:+.3f} [{paired[1]:+.3f}, {paired[2]:+.3f}]"
            lines.append(f"| {e['label']} | {','.join(str(s) for s in e['seeds'])} | "
                         f"{_fmt(e['mean'], e['test_accuracy'], e['ci95_pooled'])} | "
                         f"{_fmt(e['f1_mean'], e['f1'], e['f1_ci95_pooled'])} | "
                         f"{_fmt(e['chrf_mean'], e['chrf'], e['chrf_ci95_pooled'])} | {gap} | {paired_cell} | "
                         f"{e['trainable_parameters']:,} |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(folder, "generative_summary.md"), text)
    return text


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: quality_gen_summary.py <report folder with <task>/results.json>")
    print(summary(sys.argv[1]))

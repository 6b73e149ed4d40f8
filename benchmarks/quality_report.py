"""The quality report's outputs: one task's results.md / results.json / curves.png, and the
summary over tasks (summary.md, summary.png) with the IAPT targets.
"""
from __future__ import annotations

import json
import os
from typing import Any

from quality_methods import DEFAULTS_METHOD, METHOD_LABELS, METHODS
from report import save_figure
from iapt_fast.atomic import atomic_write_text

__all__ = ["write_outputs", "summarize", "plot_curves"]


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
        for name in ("iapt", DEFAULTS_METHOD):
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
    fig, ax = plt.subplots(figsize=(max(8.0, 0.6 * len(methods)), 4.2))
    width = 0.8 / max(len(tasks), 1)
    for t, (task, r) in enumerate(tasks.items()):
        labelled = False  # a task's first bar names it, whichever methods ran on it
        for i, m in enumerate(methods):
            e = r["methods"].get(m)
            if e is None:
                continue
            x = i + (t - (len(tasks) - 1) / 2) * width
            lo, hi = e["ci95_pooled"]  # pooled over seeds: it may not straddle the mean of the seeds
            ax.bar(x, e["mean"], width * 0.9, color=f"C{t}", label=None if labelled else task,
                   yerr=[[max(0.0, e["mean"] - lo)], [max(0.0, hi - e["mean"])]], capsize=2)
            labelled = True
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

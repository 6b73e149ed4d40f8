"""Writers of benchmark results: stdout table, results.json, results.md and PNG plots.

Also collects what names the machine (CPU model, GPU card, library versions, date, commit).
Ratios are computed from the rows here, once, so that every output shows the same numbers;
a ratio whose inputs failed is shown as n/a with the reason, never dropped.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

import torch

from suites.ratios import index
from iapt_fast.atomic import atomic_write_bytes, atomic_write_text

LIBRARIES = ("torch", "triton", "transformers", "peft", "accelerate", "numpy", "matplotlib", "iapt_fast")
STATUS_ORDER = ("ok", "failed", "skipped")


# ---------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        return None
    return None


def _git(*args: str) -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except Exception:
        return None


def machine_info(device: str) -> dict[str, Any]:
    """CPU model, cores, threads, memory, GPU card (if used), library versions, date, git commit."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    versions["torch_runtime"] = torch.__version__
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": _mem_total_gb(),
        "device": device,
        "gpu": None,
        "versions": versions,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_gb": round(props.total_memory / 2**30, 1),
                       "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda}
    return info


def machine_line(machine: dict[str, Any]) -> str:
    gpu = machine.get("gpu")
    where = f"GPU {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, CUDA {gpu['cuda']})" if gpu else \
        f"CPU {machine['cpu_model']} ({machine['cpu_count']} cores, {machine['torch_threads']} torch threads)"
    v = machine["versions"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "transformers", "peft") if v.get(k))
    return f"{where}; {libs}; python {v['python']}; {machine['date_utc']}; commit {(machine.get('git_commit') or '?')[:10]}" \
           + (" (dirty)" if machine.get("git_dirty") else "")


# ---------------------------------------------------------------------------- ratios
def compute_ratios(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The headline ratios of every suite present in ``rows``, each declared by its suite module
    (``ratios(rows, device)``), with the design.md §5 targets where one applies."""
    from suites import SUITES, suite_module

    present = {r["suite"] for r in rows}
    return [r for name in SUITES if name in present for r in suite_module(name).ratios(rows, device)]


# ---------------------------------------------------------------------------- text tables
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _status(row: dict[str, Any], width: int = 70) -> str:
    if row["status"] == "ok":
        return "ok"
    return f"{row['status'].upper()}: {row.get('error') or ''}"[:width]


def _metric(row: dict[str, Any], key: str, digits: int = 3) -> str:
    return _fmt(row["metrics"].get(key), digits) if row["status"] == "ok" else "-"


def suite_tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, cells) of every table, shared by the text and Markdown writers."""
    rows = results["rows"]
    tables = []
    ratio_cells = [[r["suite"], r["case"], r["name"], _fmt(r["value"]), r["target"] or "",
                    _fmt(r["met"]) if r["met"] is not None else "", (r["note"] or "")[:90]]
                   for r in results["ratios"]]
    tables.append(("Ratios (targets: design.md §5)", ["suite", "case", "ratio", "value", "target", "met", "note"],
                   ratio_cells))
    kr = [r for r in rows if r["suite"] == "kernels"]
    if kr:
        cells = []
        for r in kr:
            if r["method"] == "copy":
                cells.append([r["case"], "copy", "", _metric(r, "copy_median_ms"), "",
                              _metric(r, "copy_gbs"), "1", "", _status(r)])
                continue
            impl, mode = r["method"].split("/")
            p10, p90 = _metric(r, "p10_ms"), _metric(r, "p90_ms")
            cells.append([r["case"], mode, impl, _metric(r, "median_ms"), f"{p10}–{p90}", _metric(r, "gbs"),
                          _metric(r, "frac_copy_bw", 2), _metric(r, "first_call_s", 2), _status(r)])
        tables.append(("Kernels: prompt generator", ["case", "mode", "impl", "median ms", "p10–p90 ms", "GB/s",
                                                     "frac copy", "1st call s", "status"], cells))
    er = [r for r in rows if r["suite"] == "e2e"]
    if er:
        cells = [[r["case"], r["method"], _metric(r, "distinct_adapters"), _metric(r, "prefill_ms"),
                  _metric(r, "decode_ms_per_token"), _metric(r, "tokens_per_s"), _metric(r, "peak_mem_mb", 4),
                  _metric(r, "extra_mem_mb"), _status(r)] for r in er]
        tables.append(("End to end: multi-tenant greedy generation",
                       ["case", "method", "K", "prefill ms", "decode ms/step", "tokens/s", "peak MB", "extra MB",
                        "status"], cells))
    cr = [r for r in rows if r["suite"] == "compiled"]
    if cr:
        cells = [[r["case"], r["method"], _metric(r, "distinct_adapters"), _metric(r, "prefill_ms"),
                  _metric(r, "decode_ms_per_token"), _metric(r, "decode_tokens_per_s"), _metric(r, "tokens_per_s"),
                  _metric(r, "first_call_s", 2), _status(r)] for r in cr]
        tables.append(("Fast decoding path: static cache, decode step eager or compiled",
                       ["case", "method", "K", "prefill ms", "decode ms/step", "decode tokens/s", "tokens/s",
                        "1st call s", "status"], cells))
    tr = [r for r in rows if r["suite"] == "train"]
    if tr:
        cells = [[r["case"], r["method"], _metric(r, "step_ms"), _metric(r, "tokens_per_s"),
                  _metric(r, "peak_mem_mb", 4), _metric(r, "extra_mem_mb"), _metric(r, "trainable_params"),
                  _status(r)] for r in tr]
        tables.append(("Training step (forward, backward, AdamW)",
                       ["case", "method", "step ms", "tokens/s", "peak MB", "extra MB", "trainable", "status"],
                       cells))
    sr = [r for r in rows if r["suite"] == "serve"]
    if sr:
        cells = [[r["case"], r["method"], _fmt(r["params"].get("K")),
                  _metric(r, "output_tokens_per_s" if r["case"].startswith("online") else "tokens_per_s"),
                  f"{_metric(r, 'total_p10_ms')}–{_metric(r, 'total_p90_ms')}" if "total_ms" in r["metrics"] else "",
                  _metric(r, "ttft_ms"), _metric(r, "ttft_p90_ms"), _metric(r, "latency_ms"), _status(r)] for r in sr]
        tables.append(("Serving in vLLM: the same engine, base vs IAPT vs vLLM multi-LoRA",
                       ["case", "method", "K", "output tokens/s", "batch ms p10–p90", "TTFT ms", "TTFT p90 ms",
                        "latency ms", "status"], cells))
    return tables


def text_table(headers: list[str], cells: list[list[str]]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def render_text(results: dict[str, Any]) -> str:
    parts = [f"iapt_fast benchmarks — {machine_line(results['machine'])}"]
    for suite, info in results["settings"].items():
        summary = _settings_summary(suite, info) if "error" not in info else [f"suite error: {info['error']}"]
        parts.append(f"  {suite}: " + "; ".join(summary))
    for title, headers, cells in suite_tables(results)[1:] + suite_tables(results)[:1]:
        parts += ["", title, text_table(headers, cells)]
    parts += ["", summary_line(results)]
    return "\n".join(parts)


def summary_line(results: dict[str, Any]) -> str:
    counts = {s: sum(1 for r in results["rows"] if r["status"] == s) for s in STATUS_ORDER}
    ratios = results["ratios"]
    met = sum(1 for r in ratios if r["met"] is True)
    missed = sum(1 for r in ratios if r["met"] is False)
    return (f"rows: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped; "
            f"targets: {met} met, {missed} missed, {sum(1 for r in ratios if r['target'] and r['met'] is None)} "
            f"not measurable; {results['elapsed_s']:.0f} s")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(results: dict[str, Any], plots: list[str]) -> str:
    m = results["machine"]
    lines = [f"# iapt_fast benchmarks: {results['device']}{' (--quick)' if results['quick'] else ''}", "",
             f"- Machine: {machine_line(m)}", f"- Command: `{m['command']}`",
             f"- {summary_line(results)}", ""]
    for suite, info in results["settings"].items():
        lines.append(f"**{suite}**: " + "; ".join(_settings_summary(suite, info)))
        for note in info.get("notes", []):
            lines.append(f"- {note}")
        if info.get("memory"):
            lines.append(f"- memory: {info['memory']}")
        lines.append("")
    for title, headers, cells in suite_tables(results):
        lines += [f"## {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in cells]
        lines.append("")
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    return "\n".join(lines)


def _settings_summary(suite: str, info: dict[str, Any]) -> list[str]:
    out = []
    if "backbone" in info:
        b = info["backbone"]
        out.append(f"{b['name']} (d {b['hidden_size']}, {b['num_hidden_layers']} layers, ff {b['intermediate_size']}, "
                   f"vocab {b['vocab_size']}), {info.get('dtype')}")
    if "budget" in info:
        g = info["budget"]
        out.append(f"IAPT m {g['iapt_bottleneck']}, T {g['iapt_soft_tokens']}: {g['iapt_params']:,} params; "
                   f"LoRA r {g['lora_rank']} on {'/'.join(g['lora_targets'])}: {g['lora_params']:,} params")
    if "batches" in info:
        out.append(f"batch {info['batches']}, prompt {info['prompts']}, {info['new_tokens']} new tokens, "
                   f"{info['reps']} timed rounds")
    if "shapes" in info:
        out.append("(batch, seq) " + ", ".join(f"({b}, {n})" for b, n in info["shapes"]) + f", {info['steps']} timed steps")
    if "timer" in info:
        out.append(info["timer"])
    return out


# ---------------------------------------------------------------------------- plots
def _bars(ax, groups: list[str], series: list[str], value, ylabel: str, log: bool = False, spread=None) -> None:
    """Grouped bars; ``spread(group, series)`` -> (low, high) draws p10–p90 whiskers; a missing
    value is a red cross on the axis, never a silent gap."""
    width = 0.8 / max(1, len(series))
    plotted = 0
    for i, s in enumerate(series):
        xs, ys, lows, highs, missing = [], [], [], [], []
        for j, g in enumerate(groups):
            v = value(g, s)
            x = j + (i - (len(series) - 1) / 2) * width
            if v is None:
                missing.append(x)
                continue
            xs.append(x)
            ys.append(v)
            lo, hi = spread(g, s) if spread else (None, None)
            lows.append(v - lo if lo is not None else 0.0)
            highs.append(hi - v if hi is not None else 0.0)
        # Fixed colours: a series with no bar (all failed) must not shift the others' colours.
        ax.bar(xs, ys, width, label=s if xs else f"{s} (no result)", color=f"C{i}",
               yerr=[lows, highs] if spread and xs else None, capsize=2, ecolor="0.3")
        for x in missing:
            ax.text(x, 0.02, "×", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    color="red", fontsize=10)
        plotted += len(xs)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=7)
    ax.set_xlim(-0.5, len(groups) - 0.5)  # keep the crosses of missing bars inside the axes
    ax.set_ylabel(ylabel)
    if not plotted:
        ax.text(0.5, 0.5, "no results: every case failed or was skipped", transform=ax.transAxes,
                ha="center", va="center", color="red", fontsize=9)
        ax.set_yticks([])
        return
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def _getter(rows: list[dict[str, Any]], suite: str, key: str, method_of=lambda s: s):
    """(case, series) -> the metric ``key`` of that row, None unless it ran ok."""
    idx = index(rows, suite)

    def value(case: str, s: str):
        r = idx.get((case, method_of(s)))
        return r["metrics"].get(key) if r and r["status"] == "ok" else None
    return value


def _cases_and_series(rows, suite: str, series_of=lambda method: method):
    """(cases, series) of a suite's rows in first-seen order, or None when it has none."""
    mine = [r for r in rows if r["suite"] == suite and r["method"] != "copy"]
    if not mine:
        return None
    return list(dict.fromkeys(r["case"] for r in mine)), list(dict.fromkeys(series_of(r["method"]) for r in mine))


def _kernels_figure(plt, rows, title):
    found = _cases_and_series(rows, "kernels", lambda method: method.split("/")[0])
    if found is None:
        return None
    cases, impls = found
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, mode in zip(axes, ("fwd", "bwd", "fwdbwd")):
        name = (lambda s, mode=mode: f"{s}/{mode}")
        lo, hi = _getter(rows, "kernels", "p10_ms", name), _getter(rows, "kernels", "p90_ms", name)
        _bars(ax, cases, impls, _getter(rows, "kernels", "median_ms", name), "median ms (log), p10–p90", log=True,
              spread=lambda g, s, lo=lo, hi=hi: (lo(g, s), hi(g, s)))
        ax.set_title(f"generator {mode}")
    fig.suptitle(f"Kernels — {title}  (× = failed or skipped)", fontsize=8)
    return fig


def _generation_figure(plt, rows, title, suite: str, heading: str):
    found = _cases_and_series(rows, suite)
    if found is None:
        return None
    cases, methods = found
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    lo, hi = _getter(rows, suite, "prefill_p10_ms"), _getter(rows, suite, "prefill_p90_ms")
    spreads = {"prefill_ms": lambda g, s: (lo(g, s), hi(g, s))}
    for ax, (key, label) in zip(axes, (("tokens_per_s", "generated tokens/s"),
                                       ("prefill_ms", "prefill ms (p10–p90)"),
                                       ("decode_ms_per_token", "decode ms per step"))):
        _bars(ax, cases, methods, _getter(rows, suite, key), label, spread=spreads.get(key))
        ax.set_title(label)
    fig.suptitle(f"{heading} (× = failed or skipped) — {title}", fontsize=8)
    return fig


def _e2e_figure(plt, rows, title):
    return _generation_figure(plt, rows, title, "e2e", "Multi-tenant generation (K = batch adapters)")


def _compiled_figure(plt, rows, title):
    return _generation_figure(plt, rows, title, "compiled", "Static cache, decode step eager or compiled "
                                                            "(IAPT: K = batch adapters)")


def _train_figure(plt, rows, title):
    found = _cases_and_series(rows, "train")
    if found is None:
        return None
    cases, methods = found
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    _bars(axes[0], cases, methods, _getter(rows, "train", "tokens_per_s"), "trained tokens/s")
    _bars(axes[1], cases, methods, _getter(rows, "train", "peak_mem_mb"), "peak memory MB")
    fig.suptitle(f"Training step — {title}", fontsize=8)
    return fig


def _serve_figure(plt, rows, title):
    """Output tokens/s offline and online, and the online time to first token, per K."""
    from suites.serve import adapter_counts

    sr = [r for r in rows if r["suite"] == "serve"]
    if not sr:
        return None
    offline = next((r["case"] for r in sr if not r["case"].startswith("online")), None)
    online = next((r["case"] for r in sr if r["case"].startswith("online")), None)
    series = {"base engine": lambda k: "base", "IAPT": lambda k: f"iapt_k{k}",
              "vLLM multi-LoRA": lambda k: f"vllm_lora_k{k}"}
    panels = [(offline, "tokens_per_s", "offline output tokens/s"),
              (online, "output_tokens_per_s", "online output tokens/s"), (online, "ttft_ms", "online TTFT ms (median)")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (case, key, label) in zip(axes, panels):
        ks = adapter_counts(rows, case) if case else []
        value = _getter(rows, "serve", key)
        _bars(ax, [f"K={k}" for k in ks], list(series),
              lambda g, s, case=case: value(case, series[s](int(g[2:]))), label)
        ax.set_title(label)
    fig.suptitle(f"Serving in vLLM (× = failed or skipped) — {title}", fontsize=8)
    return fig


def write_plots(results: dict[str, Any], out_dir: str) -> list[str]:
    """PNG plots (matplotlib, Agg), one per suite that ran; returns file names relative to ``out_dir``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    title = machine_line(results["machine"])
    written = []
    for name, figure in (("kernels.png", _kernels_figure), ("e2e.png", _e2e_figure),
                         ("compiled.png", _compiled_figure), ("train.png", _train_figure),
                         ("serve.png", _serve_figure)):
        fig = figure(plt, results["rows"], title)
        if fig is None:
            continue
        fig.tight_layout()
        save_figure(fig, os.path.join(out_dir, name))
        plt.close(fig)
        written.append(name)
    return written


def save_figure(fig: Any, path: str, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG at ``path``, written atomically (old or new, never a part)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def write_all(results: dict[str, Any], out_dir: str) -> dict[str, str]:
    """results.json, results.md and the plots; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    try:
        plots = write_plots(results, out_dir)
    except Exception as err:  # a plot must never cost the tables and the JSON
        plots = []
        results["plot_error"] = f"{type(err).__name__}: {err}"
    results["plots"] = plots
    json_path = os.path.join(out_dir, "results.json")
    atomic_write_text(json_path, json.dumps(results, indent=1, default=str))
    md_path = os.path.join(out_dir, "results.md")
    atomic_write_text(md_path, render_markdown(results, plots))
    return {"json": json_path, "markdown": md_path, **{p: os.path.join(out_dir, p) for p in plots}}

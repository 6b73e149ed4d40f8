#!/usr/bin/env python
"""iapt_fast benchmarks: the one entry point.

    python benchmarks/run.py                       # every suite, cuda if present (CPU: < 10 min on 2 cores)
    python benchmarks/run.py --quick               # smoke run (< 3 min on CPU)
    python benchmarks/run.py --suite e2e --device cpu --out /tmp/bench

Suites:
    kernels  the prompt generator alone: forward, backward, forward+backward; GPU: Triton vs eager
             reference vs torch.compile of it, GB/s and fraction of a measured copy; CPU: eager vs compile
    e2e      multi-tenant greedy generation: base, IAPT with K adapters, PEFT LoRA mixed batch,
             gathered-BMM LoRA, merged LoRA; prefill, decode per step, tokens/s, peak memory
    compiled the fast decoding path: static KV cache, eager and with the decode step compiled by
             generate() ("reduce-overhead" CUDA graphs on CUDA), base vs IAPT with K adapters
    train    one training step, IAPT vs LoRA at a comparable parameter budget
    serve    vLLM serving (its own environment, README "Serving"): the same engine serving the base,
             IAPT with K = 1, 4, 16 adapters and vLLM multi-LoRA; offline batch throughput, online
             Poisson arrivals (time to first token); part of "all" only when the serve environment
             exists (.venv-serve or $IAPT_SERVE_PYTHON) and without --quick, with its own budget on
             top (CPU ~5 min; --budget-s applies to it when it runs alone)

Writes results.json (every row, the machine, versions, settings), results.md and PNG plots to
--out (default benchmarks/results/<device>-<YYYY-MM-DD>/) and prints the tables with the
ratios against the design.md §5 targets. A method that fails is a failed row with its error; a
case the time budget (--budget-s) cannot fit is a skipped row with the reason.
Exit status: 1 when any row of the project's own methods failed (a generator implementation of the
kernels suite, an IAPT method, or a suite that crashed), also 1 with --strict when any row failed
(a baseline such as LoRA included); 0 otherwise. The run ends with a summary naming the failed rows.

results.json:
    machine    date_utc, cpu_model, cpu_count, torch_threads, memory_gb, gpu {name, capability,
               memory_gb, cuda} or null, versions {python, torch, triton, transformers, peft, ...},
               git_commit, git_dirty, command
    settings   per suite: backbone, dtype, grid, LoRA/IAPT parameter budget, timer, memory metric, notes
    rows       one per (suite, case, method): params, status ok|failed|skipped, error, traceback,
               metrics (kernels: median_ms p10_ms p90_ms gbs frac_copy_bw bytes first_call_s;
               e2e: prefill_ms decode_ms_per_token tokens_per_s total_ms peak_mem_mb weights_mb
               extra_mem_mb distinct_adapters ...; compiled: the e2e timings + first_call_s;
               train: step_ms tokens_per_s peak_mem_mb ...), seconds
    ratios     suite, case, name, value (null when an input failed), target, met, note
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
import warnings
from typing import Any

# Run as a script, this folder is sys.path[0]: its modules import each other by their own names
# (tests get the folder from pytest.ini's `pythonpath`), the library comes from the install.
from suites import SUITES, SuiteOptions, suite_module

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCHEMA_VERSION = 1
# Whole-run wall-clock budgets: the GPU run must fit one device call (< 8 min), the default
# CPU run README's promise (< 10 min on 2 cores). Cases past the budget become skipped rows.
DEFAULT_BUDGET_S = {"cuda": 420.0, "cpu": 540.0}
QUICK_BUDGET_S = {"cuda": 240.0, "cpu": 150.0}
# The serve suite's own budget: three engine starts and the interleaved rounds (CPU: ~4-5 min on an idle core).
SERVE_BUDGET_S = {"cuda": 360.0, "cpu": 420.0}
QUICK_SERVE_BUDGET_S = {"cuda": 200.0, "cpu": 200.0}
# Each suite gets this share of what is left when it starts (unused time carries over), so a
# slow suite cannot starve the ones after it.
# On CUDA the kernel suite pays for torch.compile of several graphs; on the CPU, e2e and the
# compiled suite dominate (its batch-8 case alone is estimated at ~3 min with its compile warm-up;
# at 0.2 it was skipped on 2 cores although the whole run used half its budget).
SUITE_WEIGHTS = {"cuda": {"kernels": 0.4, "e2e": 0.3, "compiled": 0.2, "train": 0.1},
                 "cpu": {"kernels": 0.2, "e2e": 0.35, "compiled": 0.35, "train": 0.1}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import torch

    from suites.e2e import DEFAULT_LORA_TARGETS
    from suites.models import DEFAULT_METHODS, METHODS

    head, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=head, epilog=rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda if available")
    parser.add_argument("--suite", choices=SUITES + ("all",), default="all")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run for CI")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>-<date>/)")
    parser.add_argument("--methods", default=None,
                        help=f"e2e methods, comma-separated, from {','.join(METHODS)} "
                             f"(default: all; iapt_torch only on cuda)")
    parser.add_argument("--lora-targets", default=",".join(DEFAULT_LORA_TARGETS),
                        help="LoRA target modules (their rank is set to match IAPT's parameter count)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget in seconds; cases that would start after it, or would not "
                             f"fit in it, are reported as skipped (default: {DEFAULT_BUDGET_S}, --quick "
                             f"{QUICK_BUDGET_S})")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 if any row failed, baselines included (without it: only the project's own rows)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.methods is None:
        args.methods = ",".join(DEFAULT_METHODS[args.device])
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    args.lora_targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if not args.lora_targets:
        parser.error("--lora-targets must name at least one module")
    if args.budget_s is None:
        defaults = (QUICK_SERVE_BUDGET_S if args.quick else SERVE_BUDGET_S) if args.suite == "serve" else \
            (QUICK_BUDGET_S if args.quick else DEFAULT_BUDGET_S)
        args.budget_s = defaults[args.device]
    if args.out is None:
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
        args.out = os.path.join(REPO_ROOT, "benchmarks", "results", f"{args.device}-{date}" + ("-quick" if args.quick else ""))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    # Deprecation chatter of transformers/peft internals would break the progress bar.
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    import report
    from suites import serve
    from suites.common import Budget, Recorder

    suites = default_suites(serve.serve_python()[0] is not None, args.quick) if args.suite == "all" else [args.suite]
    opts = SuiteOptions(device=args.device, quick=args.quick, methods=tuple(args.methods),
                        lora_targets=tuple(args.lora_targets))
    total = sum(suite_module(s).count(opts) for s in suites)
    start = time.perf_counter()
    machine = report.machine_info(args.device)
    progress = tqdm(total=total, desc="benchmarks", unit="case", disable=args.no_progress, file=sys.stderr,
                    dynamic_ncols=True)
    rec = Recorder(Budget(args.budget_s), progress)
    settings: dict[str, Any] = {}
    for i, suite in enumerate(suites):
        progress.set_description(suite)
        left = args.budget_s - (time.perf_counter() - start)
        weights = SUITE_WEIGHTS[args.device]
        if suite == "serve":
            rec.budget = Budget(args.budget_s if args.suite == "serve" else
                                (QUICK_SERVE_BUDGET_S if args.quick else SERVE_BUDGET_S)[args.device])
        else:
            share = weights[suite] / sum(weights.get(s, 0.0) for s in suites[i:])
            rec.budget = Budget(max(0.0, left * share))
        try:
            settings[suite] = suite_module(suite).run(rec, opts)
        except Exception as err:  # a broken suite is reported, and the others still run
            rec.fail(suite, "suite", "harness", {}, f"{type(err).__name__}: {err}")
            settings[suite] = {"error": f"{type(err).__name__}: {err}"}
    progress.close()
    rows = [r.to_dict() for r in rec.rows]
    results = {
        "schema_version": SCHEMA_VERSION,
        "device": args.device,
        "quick": args.quick,
        "suites": suites,
        "args": {k: v for k, v in vars(args).items()},
        "budget_s": args.budget_s,
        "elapsed_s": time.perf_counter() - start,
        "machine": machine,
        "settings": settings,
        "rows": rows,
        "ratios": report.compute_ratios(rows, args.device),
    }
    paths = report.write_all(results, args.out)
    print(report.render_text(results))
    print("\nwrote " + ", ".join(os.path.relpath(p) for p in paths.values()))
    failed = [r for r in rows if r["status"] == "failed"]
    own = [r for r in failed if is_own_method(r)]
    print(final_summary(rows, own, failed, args.strict))
    return 1 if own or (args.strict and failed) else 0


def default_suites(serve_env: bool, quick: bool) -> list[str]:
    """The suites of ``--suite all``: the serve suite only where its environment exists, so that
    a run without it measures every row it reports, and not in the --quick smoke run (its three
    engine starts alone take minutes on a CPU; ``--quick --suite serve`` runs it)."""
    return [s for s in SUITES if s != "serve" or (serve_env and not quick)]


def is_own_method(row: dict[str, Any]) -> bool:
    """Whether a row measures the project itself: every generator implementation of the kernels
    suite, an IAPT method of the others, or a suite that crashed before its rows."""
    return row["suite"] == "kernels" or row["method"].startswith("iapt") or row["method"] == "harness"


def final_summary(rows: list[dict[str, Any]], own: list[dict[str, Any]], failed: list[dict[str, Any]],
                  strict: bool) -> str:
    """The last lines of a run: the verdict, then every failed row with its error."""
    ok = sum(r["status"] == "ok" for r in rows)
    if own:
        verdict = f"FAILED: {len(own)} row(s) of iapt_fast's own methods failed (exit status 1)"
    elif failed and strict:
        verdict = f"FAILED (--strict): {len(failed)} baseline row(s) failed (exit status 1)"
    elif failed:
        verdict = f"OK: every iapt_fast row ran; {len(failed)} baseline row(s) failed (exit status 0)"
    else:
        verdict = f"OK: {ok} rows measured, none failed (exit status 0)"
    lines = ["", "=" * 8 + " summary " + "=" * 8, verdict]
    for r in failed:
        first = (r.get("error") or "").strip().splitlines()
        lines.append(f"  failed {'[iapt_fast]' if is_own_method(r) else '[baseline]'} {r['suite']} "
                     f"{r['case']} {r['method']}: {first[0] if first else 'no error text'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

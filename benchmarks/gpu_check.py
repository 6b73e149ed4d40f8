"""GPU check of the fused generator kernels: correctness at realistic size, then timings.

Times forward and forward+backward at bf16, d = 4096, m = 320, T = 4, for 2k–64k tokens and 1
or 32 adapters: the Triton kernels (the autograd.Function of eager calls, and the custom operator
torch.compile calls) vs the eager PyTorch reference vs torch.compile of the reference
(triton.testing.do_bench medians), with the achieved bandwidth of reading H
against a measured device-to-device copy. Writes Markdown + JSON under benchmarks/results/
naming the card and the date, and prints a short table last.

    python benchmarks/gpu_check.py                 # on a CUDA machine (benchmarks/gpu_check.sh)
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --dry-run   # CPU: tiny shapes, interpreter
    python benchmarks/gpu_check.py --fused-sweep   # one-launch vs multi-launch inference forward only
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from iapt_fast.generator import functional, reference
from iapt_fast.generator.inputs import random_inputs
from iapt_fast.generator.functional import prompt_generator_op
from iapt_fast.generator.weights import GeneratorWeights
from suites.common import bandwidth_gbs, copy_bandwidth_gbs

ROOT = Path(__file__).resolve().parents[1]

# (batch, instruction length): B·N from 2k to 64k tokens; the last two are few long rows,
# where the forward splits N (flash-decoding) to fill the GPU.
REAL_SHAPES = [(4, 512), (16, 512), (32, 512), (64, 512), (64, 1024), (128, 512), (2, 8192), (1, 16384)]
DRY_SHAPES = [(2, 40), (1, 100)]


def bench(fn, cuda: bool) -> float:
    """Median milliseconds of fn()."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_inputs(batch, seq, dim, bottleneck, tokens, adapters, device, dtype, seed=0):
    inp = random_inputs(batch, seq, dim, bottleneck, tokens, adapters, (6, 5), dtype=dtype, device=device, seed=seed,
                        min_fill=0.5)
    return inp.hidden, inp.mask, list(inp.weights.values()), inp.adapter_ids


def run_case(batch, seq, adapters, args, cuda, compiled_fn, copy_gbs):
    device = "cuda" if cuda else "cpu"
    dt = torch.bfloat16
    hidden, mask, weights, ids = make_inputs(batch, seq, args.dim, args.bottleneck, args.tokens, adapters, device, dt)
    leaves = [hidden.requires_grad_(True)] + [w.requires_grad_(True) for w in weights]

    impls = {
        "triton": lambda: functional.prompt_generator(leaves[0], mask, *leaves[1:], adapter_ids=ids, backend="triton"),
        # The custom operator torch.compile sees: the same kernels forward; its registered
        # backward recomputes the forward (a stateless operator keeps no statistics).
        "op": lambda: prompt_generator_op(leaves[0], mask, *leaves[1:], ids, None, None, "B"),
        "eager": lambda: reference.prompt_generator(leaves[0], mask, GeneratorWeights(*leaves[1:]), ids),
    }
    if compiled_fn is not None:
        impls["compile"] = lambda: compiled_fn(leaves[0], mask, *leaves[1:], ids)
    grad = torch.randn(batch, args.tokens, args.dim, device=device, dtype=dt)

    row = {"batch": batch, "seq": seq, "tokens": batch * seq, "adapters": adapters}
    # Correctness at this size: max error of Triton and of the bf16 reference vs float32 reference.
    with torch.no_grad():
        out = impls["triton"]().float()
        ref32 = reference.prompt_generator(hidden.float(), mask, GeneratorWeights(*[w.float() for w in weights]), ids)
        ref_bf = impls["eager"]().float()
        op_out = impls["op"]().float()
    row["max_err_triton"] = float((out - ref32).abs().max())
    row["max_err_op"] = float((op_out - ref32).abs().max())
    row["max_err_bf16_reference"] = float((ref_bf - ref32).abs().max())
    row["finite"] = bool(torch.isfinite(out).all())

    for name, fn in impls.items():
        try:
            with torch.no_grad():
                fwd = bench(fn, cuda)

            def fwd_bwd(fn=fn):
                o = fn()
                o.backward(grad)
                for leaf in leaves:
                    leaf.grad = None

            both = bench(fwd_bwd, cuda)
            row[f"{name}_fwd_ms"] = fwd
            row[f"{name}_bwd_ms"] = max(both - fwd, 0.0)
        except Exception as err:  # e.g. out of memory in the eager reference at 64k tokens
            row[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
            if cuda:
                torch.cuda.empty_cache()
    h_bytes = batch * seq * args.dim * hidden.element_size()
    if "triton_fwd_ms" in row:
        gbs = bandwidth_gbs(h_bytes, row["triton_fwd_ms"])
        row["triton_fwd_GBps"] = gbs
        row["fwd_fraction_of_copy"] = gbs / copy_gbs
        for other in ("eager", "compile", "op"):
            if f"{other}_fwd_ms" in row:
                row[f"fwd_speedup_vs_{other}"] = row[f"{other}_fwd_ms"] / row["triton_fwd_ms"]
                row[f"bwd_speedup_vs_{other}"] = row[f"{other}_bwd_ms"] / max(row["triton_bwd_ms"], 1e-9)
    return row


# B×N of the inference-forward sweep (one-launch vs multi-launch): 1×32 to 64×1024.
SWEEP_BATCHES = (1, 4, 16, 64)
SWEEP_SEQS = (32, 128, 512, 1024)
DRY_SWEEP = ((1, 32), (3, 40))


def fused_sweep(args, cuda, copy_gbs) -> list[dict]:
    """Latency of the one-launch and the multi-launch inference forward side by side (no grad,
    W_down·W_pool cached as serving caches it), with the fraction of the copy bandwidth that
    reading H once, the used weights once and writing P would need at that latency."""
    from iapt_fast.kernels import triton_prompt_generator
    from iapt_fast.kernels.autograd import generator_weight_products
    from iapt_fast.kernels.launch import fused_forward_pays

    device = "cuda" if cuda else "cpu"
    shapes = DRY_SWEEP if args.dry_run else [(b, n) for b in SWEEP_BATCHES for n in SWEEP_SEQS]
    rows = []
    for adapters in args.adapters:
        for batch, seq in shapes:
            hidden, mask, weights, ids = make_inputs(batch, seq, args.dim, args.bottleneck, args.tokens, adapters,
                                                     device, torch.bfloat16)
            gw = GeneratorWeights(*weights)
            with torch.no_grad():
                products = generator_weight_products(gw.w_down, gw.w_pool)
                ref32 = reference.prompt_generator(hidden.float(), mask, GeneratorWeights(*[w.float() for w in weights]),
                                                   ids)
                row = {"batch": batch, "seq": seq, "tokens": batch * seq, "adapters": adapters,
                       "policy_picks_fused": fused_forward_pays(batch, args.dim, args.bottleneck, hidden.dtype,
                                                                gw.w_down.element_size(), hidden.device)}
                used = int(ids.unique().numel()) if ids is not None else 1
                nbytes = (hidden.numel() * hidden.element_size() + batch * args.tokens * args.dim * 2
                          + used * 2 * args.dim * args.bottleneck * gw.w_down.element_size())
                for name, fused in (("one_launch", True), ("multi_launch", False)):
                    def fn(fused=fused):
                        return triton_prompt_generator(hidden, mask, gw, ids, "B", weight_products=products, fused=fused)
                    row[f"max_err_{name}"] = float((fn().float() - ref32).abs().max())
                    row[f"{name}_ms"] = bench(fn, cuda)
                    row[f"{name}_frac_copy"] = bandwidth_gbs(nbytes, row[f"{name}_ms"]) / copy_gbs
            row["multi_over_one"] = row["multi_launch_ms"] / row["one_launch_ms"]
            rows.append(row)
            print(f"  {batch}x{seq} A={adapters}: one-launch {fmt(row['one_launch_ms'])} ms, multi-launch "
                  f"{fmt(row['multi_launch_ms'])} ms (policy: {'one' if row['policy_picks_fused'] else 'multi'})",
                  flush=True)
    return rows


def sweep_markdown(meta, rows) -> str:
    lines = [f"# Inference forward: one launch vs multi-launch on {meta['device']} ({meta['date']})", "",
             f"bf16, d={meta['dim']}, m={meta['bottleneck']}, T={meta['tokens']}, no grad, W_down·W_pool cached; "
             f"do_bench medians (ms); % of copy = (H + used weights + P bytes) / time over the measured copy "
             f"bandwidth ({meta['copy_GBps']:.0f} GB/s). Policy = what launch.fused_forward_pays picks.", "",
             "| B×N | adapters | one-launch ms | multi-launch ms | multi ÷ one | one % copy | multi % copy | policy | "
             "max err one / multi |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']}×{r['seq']} | {r['adapters']} | {fmt(r['one_launch_ms'])} | "
                     f"{fmt(r['multi_launch_ms'])} | {fmt(r['multi_over_one'], '.2f')} | "
                     f"{fmt(100 * r['one_launch_frac_copy'], '.1f')} | {fmt(100 * r['multi_launch_frac_copy'], '.1f')} | "
                     f"{'one' if r['policy_picks_fused'] else 'multi'} | {fmt(r['max_err_one_launch'], '.2e')} / "
                     f"{fmt(r['max_err_multi_launch'], '.2e')} |")
    return "\n".join(lines) + "\n"


def fmt(v, spec=".3g"):
    return "—" if v is None else format(v, spec)


def markdown(meta, rows) -> str:
    lines = [f"# Generator kernels on {meta['device']} ({meta['date']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, bf16, d={meta['dim']}, m={meta['bottleneck']}, "
             f"T={meta['tokens']}; do_bench medians (ms). Copy bandwidth (read+write): {meta['copy_GBps']:.0f} GB/s. "
             "GB/s = bytes of H read once / forward time.", "",
             "Custom op = `iapt_fast::prompt_generator` called eagerly (the path torch.compile takes): same "
             "forward kernels, a backward that recomputes the forward; op ÷ Function = its time over the "
             "autograd.Function's (eager path).", "",
             "| B×N | adapters | Triton fwd | eager fwd | compile fwd | Triton bwd | eager bwd | compile bwd | "
             "op fwd | op bwd | op ÷ Function fwd / bwd | "
             "fwd GB/s | % of copy | fwd × eager | fwd × compile | bwd × eager | max err (Triton / op / bf16 ref) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['batch']}×{r['seq']} | {r['adapters']} | {fmt(r.get('triton_fwd_ms'))} | {fmt(r.get('eager_fwd_ms'))} | "
            f"{fmt(r.get('compile_fwd_ms'))} | {fmt(r.get('triton_bwd_ms'))} | {fmt(r.get('eager_bwd_ms'))} | "
            f"{fmt(r.get('compile_bwd_ms'))} | {fmt(r.get('op_fwd_ms'))} | {fmt(r.get('op_bwd_ms'))} | "
            f"{fmt(r.get('fwd_speedup_vs_op'), '.2f')} / {fmt(r.get('bwd_speedup_vs_op'), '.2f')} | "
            f"{fmt(r.get('triton_fwd_GBps'), '.0f')} | "
            f"{fmt(100 * r['fwd_fraction_of_copy'] if 'fwd_fraction_of_copy' in r else None, '.0f')} | "
            f"{fmt(r.get('fwd_speedup_vs_eager'), '.1f')} | {fmt(r.get('fwd_speedup_vs_compile'), '.1f')} | "
            f"{fmt(r.get('bwd_speedup_vs_eager'), '.1f')} | {fmt(r['max_err_triton'], '.2e')} / "
            f"{fmt(r['max_err_op'], '.2e')} / "
            f"{fmt(r['max_err_bf16_reference'], '.2e')} |")
    errors = [(r["batch"], r["seq"], r["adapters"], k, v) for r in rows for k, v in r.items() if k.endswith("_error")]
    if errors:
        lines += ["", "Errors:"] + [f"- {b}×{n}, {a} adapters, {k}: {v}" for b, n, a, k, v in errors]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--compile-tokens", type=int, nargs="*", default=None,
                        help="B·N values at which torch.compile of the reference is also timed (each shape and "
                             "adapter count compiles forward and backward, ~30 s each; default 16384, none in --dry-run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--fused-sweep", action="store_true",
                        help="only time the one-launch vs the multi-launch inference forward over B·N 1×32..64×1024")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device; use --dry-run (with TRITON_INTERPRET=1) on a CPU", file=sys.stderr)
        return 2
    if args.dry_run and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_check --dry-run on CPU needs TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if args.dry_run:
        args.dim, args.bottleneck, args.tokens, shapes = 64, 20, 4, DRY_SHAPES
        args.adapters = [1, 3]
        args.compile_tokens = args.compile_tokens or []
    else:
        args.dim, args.bottleneck, args.tokens, shapes = 4096, 320, 4, REAL_SHAPES
        args.compile_tokens = [16384] if args.compile_tokens is None else args.compile_tokens

    import triton

    meta = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU interpreter ({platform.processor() or 'cpu'})",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "triton": triton.__version__, "dim": args.dim,
        "bottleneck": args.bottleneck, "tokens": args.tokens, "dry_run": args.dry_run,
    }
    meta["copy_GBps"] = copy_bandwidth_gbs("cuda" if cuda else "cpu", (1 << 30) if cuda else (1 << 24))["copy_gbs"]
    print(f"{meta['device']}: copy bandwidth {meta['copy_GBps']:.0f} GB/s", flush=True)
    card = "".join(c if c.isalnum() else "_" for c in meta["device"]).strip("_")[:40]
    if args.fused_sweep:
        rows = fused_sweep(args, cuda, meta["copy_GBps"])
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"gpu_check_fused_{card}_{_dt.date.today().isoformat()}" + ("_dryrun" if args.dry_run else "")
        md = sweep_markdown(meta, rows)
        (args.out / f"{stem}.md").write_text(md)
        (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"\nwrote {args.out / stem}.md/.json\n")
        print(md)
        return 0
    compiled = torch.compile(reference.prompt_generator) if args.compile_tokens else None

    # torch.compile only at the first shape of each listed size: every new shape recompiles.
    compile_shapes = {next((b, n) for b, n in shapes if b * n == t) for t in args.compile_tokens
                      if any(b * n == t for b, n in shapes)}
    rows = []
    for adapters in args.adapters:
        for batch, seq in shapes:
            use_compile = compiled if (batch, seq) in compile_shapes else None
            start = time.time()
            row = run_case(batch, seq, adapters, args, cuda, use_compile, meta["copy_GBps"])
            rows.append(row)
            print(f"  {batch}x{seq} A={adapters}: triton fwd {fmt(row.get('triton_fwd_ms'))} ms, "
                  f"bwd {fmt(row.get('triton_bwd_ms'))} ms, op fwd {fmt(row.get('op_fwd_ms'))} ms, "
                  f"bwd {fmt(row.get('op_bwd_ms'))} ms, eager fwd {fmt(row.get('eager_fwd_ms'))} ms "
                  f"({time.time() - start:.0f} s)", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_check_{card}_{_dt.date.today().isoformat()}" + ("_dryrun" if args.dry_run else "")
    md = markdown(meta, rows)
    (args.out / f"{stem}.md").write_text(md)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {args.out / stem}.md/.json\n")
    print(md)
    bad = [r for r in rows if not r["finite"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

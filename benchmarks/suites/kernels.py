"""Kernel suite: the prompt generator alone — forward, backward, forward+backward.

GPU: the Triton kernels vs the eager reference vs torch.compile of the reference, timed with
triton.testing.do_bench; achieved GB/s and its fraction of a device-to-device copy measured
in the same run. CPU: eager reference vs torch.compile of it (timeit-style medians); the
Triton kernels only run in the interpreter there, which is a correctness tool, not a backend.

Bytes moved are the minimal DRAM traffic of each mode (what a perfectly fused kernel must
read and write): forward reads H, the mask and the used adapters' weights and writes P;
backward reads H, dP, the mask and the weights and writes dH and the weight gradients;
forward+backward is their sum (H is read twice: the backward recomputes).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from suites import SuiteOptions
from suites.ratios import index, ratio, value
from suites.common import Recorder, bandwidth_gbs, copy_bandwidth_gbs, time_fn
from iapt_fast.generator.weights import GeneratorWeights

SUITE = "kernels"
MODES = ("fwd", "bwd", "fwdbwd")
DEGREES = (6, 5)


@dataclass(frozen=True)
class KernelCase:
    """Shapes of one kernel measurement: B rows of N tokens, hidden d, bottleneck m, T tokens, A adapters."""

    batch: int
    seq: int
    d: int
    m: int
    t: int
    adapters: int
    dtype: str

    @property
    def name(self) -> str:
        return f"B{self.batch}xN{self.seq} d{self.d} m{self.m} A{self.adapters} {self.dtype}"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def cases(device: str, quick: bool) -> list[KernelCase]:
    """The shape grid. GPU: bf16 up to d = 4096, m = 320, B·N = 64k. CPU: float32, small."""
    if device == "cuda":
        bf = "bfloat16"
        # Most important first (design.md §5 targets: d = 4096, B·N >= 16k), so a run cut short by
        # its time budget skips the least informative shapes.
        grid = [
            KernelCase(32, 512, 4096, 320, 4, 1, bf),     # 16k tokens
            KernelCase(64, 1024, 4096, 320, 4, 1, bf),    # 64k tokens
            KernelCase(32, 512, 4096, 320, 4, 32, bf),    # 16k tokens, every row its own adapter
            KernelCase(2, 8192, 4096, 320, 4, 1, bf),     # 16k tokens in 2 long rows: split over N
            KernelCase(64, 1024, 4096, 320, 4, 32, bf),   # 64k tokens, 32 adapters
            KernelCase(8, 256, 4096, 320, 4, 1, bf),      # 2k tokens
            KernelCase(8, 256, 1024, 80, 4, 1, bf),       # small
        ]
        return [grid[0], grid[-1]] if quick else grid
    f32 = "float32"
    if quick:
        return [KernelCase(4, 64, 128, 16, 4, 4, f32)]
    # One (d, m): with B and N dynamic, torch.compile builds four graphs in all (A = 1 / 32,
    # with / without grad) instead of one per shape — compiling dominates the CPU suite.
    return [
        KernelCase(8, 256, 512, 40, 4, 1, f32),       # 2k tokens
        KernelCase(32, 512, 512, 40, 4, 1, f32),      # 16k tokens
        KernelCase(32, 512, 512, 40, 4, 32, f32),     # 16k tokens, every row its own adapter
        KernelCase(32, 48, 512, 40, 4, 4, f32),       # a serving prefill: 32 short prompts over 4 adapters
    ]


def impls(device: str) -> list[str]:
    # CPU: the literal reference and its compile, the library's CPU path, and the plain matmul
    # pipeline of the same math that the CPU path is held to (within 1.5× in fwd).
    return ["eager", "compile", "triton"] if device == "cuda" else ["eager", "compile", "cpu_fast", "plain"]


def plain_pipeline(hidden: torch.Tensor, mask: torch.Tensor, weights: GeneratorWeights,
                   adapter_ids: torch.Tensor | None) -> torch.Tensor:
    """The generator's math as a plain chain of matmuls — the yardstick of the CPU path: scores
    H·W_down·W_pool [B, N, T], masked softmax over N, pooled ·H ·W_down, rational, ·W_up. Each row's
    weights gathered when the batch mixes adapters. [B, N, d] → [B, T, d]."""
    from iapt_fast.generator.rational import rational

    w = GeneratorWeights(*(None if t is None else (t[0] if adapter_ids is None else t.index_select(0, adapter_ids))
                           for t in weights))
    scores = torch.matmul(hidden, torch.matmul(w.w_down, w.w_pool))  # [B, N, T]
    attn = torch.softmax(scores.masked_fill(~mask[:, :, None], float("-inf")), dim=1).nan_to_num()
    pooled = torch.matmul(torch.matmul(attn.transpose(1, 2), hidden), w.w_down)  # p: [B, T, m]
    num, den = (w.rat_num, w.rat_den) if adapter_ids is None else (w.rat_num[:, None, None], w.rat_den[:, None, None])
    out = torch.matmul(rational(pooled, num, den), w.w_up)
    if w.anchor_scale is not None:
        out = out * (w.anchor_scale if adapter_ids is None else w.anchor_scale[:, None, None])
    return out if w.anchor is None else out + w.anchor


def count(opts: SuiteOptions) -> int:
    device, quick = opts.device, opts.quick
    return len(cases(device, quick)) * len(impls(device)) * len(MODES) + 1


def bytes_moved(case: KernelCase, mode: str, used_adapters: int) -> int:
    """Minimal DRAM traffic of ``mode`` (see the module docstring)."""
    s = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    weights = (2 * case.d * case.m + case.m * case.t + DEGREES[0] + 1 + DEGREES[1]) * s * used_adapters
    h = case.tokens * case.d * s
    mask = case.tokens
    p = case.batch * case.t * case.d * s
    fwd = h + mask + weights + p
    bwd = 2 * h + mask + 2 * weights + p
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def make_inputs(case: KernelCase, device: str, seed: int = 0) -> dict[str, Any]:
    """Random generator inputs, drawn on ``device``; about a tenth of each row is padding."""
    from iapt_fast.generator.inputs import random_inputs

    inp = random_inputs(case.batch, case.seq, case.d, case.m, case.t, case.adapters, DEGREES,
                        dtype=getattr(torch, case.dtype), device=device, seed=seed, min_fill=0.9)
    return {"hidden": inp.hidden, "mask": inp.mask, "weights": inp.weights, "adapter_ids": inp.adapter_ids,
            "used_adapters": inp.used_adapters}


def generator_fn(impl: str, device: str) -> Callable[..., torch.Tensor]:
    """The callable (hidden, mask, weights: GeneratorWeights, adapter_ids) of ``impl``."""
    from iapt_fast.generator import reference

    if impl == "eager":
        return reference.prompt_generator
    if impl == "compile":
        # Every (shape, grad mode) is its own graph: lift the recompile limit so that none
        # silently falls back to eager.
        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, key):
                setattr(torch._dynamo.config, key, max(64, getattr(torch._dynamo.config, key)))
        # Donated buffers forbid retain_graph=True, which the backward-only timing needs.
        import torch._functorch.config as functorch_config
        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        return torch.compile(reference.prompt_generator)
    if impl == "cpu_fast":
        from iapt_fast.generator import cpu_fast

        return cpu_fast.prompt_generator
    if impl == "plain":
        return plain_pipeline
    if impl == "triton":
        if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            # run.py never lists Triton on the CPU; the tests drive this path in the interpreter.
            raise RuntimeError("the Triton kernels are timed on CUDA only (the interpreter is not a backend)")
        from iapt_fast.kernels import triton_prompt_generator

        return triton_prompt_generator
    raise ValueError(f"unknown impl {impl!r}")


def check_forward(out: torch.Tensor, inp: dict[str, Any], impl: str) -> dict[str, float]:
    """Never time wrong code: the output must pass the design.md §4 rule against the reference.

    max|out − ref32| ≤ 2·max|ref_dtype − ref32| + atol, ref32 = the reference in float32.
    """
    from iapt_fast.generator import reference
    from iapt_fast.generator.tolerance import rule_error

    hidden, mask, ids = inp["hidden"], inp["mask"], inp["adapter_ids"]
    weights = list(inp["weights"].values())
    with torch.no_grad():
        ref32 = reference.prompt_generator(hidden.float(), mask, GeneratorWeights(*[w.float() for w in weights]), ids)
        ref_pt = reference.prompt_generator(hidden, mask, GeneratorWeights(*weights), ids)
    if not torch.isfinite(out).all():
        raise FloatingPointError(f"{impl} forward produced non-finite values")
    err, bound = rule_error(out, ref32, ref_pt)
    if err > bound:
        raise AssertionError(f"{impl} forward is wrong: max error {err:.3e} > 2×(reference error) + atol = {bound:.3e}")
    return {"max_abs_err": err, "err_bound": bound}


def measure(case: KernelCase, impl: str, mode: str, device: str, fn: Callable[..., torch.Tensor],
            copy_gbs: float | None, quick: bool, inp: dict[str, Any] | None = None) -> dict[str, float | None]:
    """Time one (case, impl, mode); returns the row's metrics. ``inp``: from make_inputs (reused)."""
    import time

    inp = inp if inp is not None else make_inputs(case, device)
    # Fresh leaves per measurement: requires_grad and dynamic-shape marks must not leak across rows.
    hidden, mask, ids = inp["hidden"].detach().clone(), inp["mask"], inp["adapter_ids"]
    weights = [w.detach().clone() for w in inp["weights"].values()]
    if impl == "compile":
        # Mark B and N dynamic so one compiled graph serves every (B, N) of a (d, m, A).
        torch._dynamo.maybe_mark_dynamic(hidden, 0)
        torch._dynamo.maybe_mark_dynamic(hidden, 1)
    start = time.perf_counter()
    if mode == "fwd":
        extra = {}
        if impl == "triton":  # inference: W_down·W_pool cached per weights version, as serving does
            from iapt_fast.kernels.autograd import generator_weight_products

            extra["weight_products"] = generator_weight_products(weights[0], weights[1])

        def run() -> Any:
            with torch.no_grad():
                return fn(hidden, mask, GeneratorWeights(*weights), ids, **extra)
    else:
        leaves = [hidden.requires_grad_(True)] + [w.requires_grad_(True) for w in weights]
        grad_out = torch.randn(case.batch, case.t, case.d, device=device, dtype=hidden.dtype)
        if mode == "bwd":
            out = fn(hidden, mask, GeneratorWeights(*weights), ids)

            def run() -> Any:
                return torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
        else:
            def run() -> Any:
                return torch.autograd.grad(fn(hidden, mask, GeneratorWeights(*weights), ids), leaves, grad_out)
    result = run()  # first call: compiles (torch.compile / Triton JIT); timed separately
    launches = None
    if impl == "triton":  # kernel launches of one call, recorded (not run) after the real call
        from iapt_fast.kernels import record_launches

        with record_launches() as specs:
            run()
        launches = float(len(specs))
    if device == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    checked = {}
    if mode == "fwd":
        checked = check_forward(result, inp, impl)
    timing = time_fn(device, run, target_s=0.3 if quick else 0.8, min_reps=3 if quick else 5)
    nbytes = bytes_moved(case, mode, inp["used_adapters"])
    gbs = bandwidth_gbs(nbytes, timing.median_ms)
    return {**timing.as_metrics(), **checked, "first_call_s": first_s, "bytes": float(nbytes), "gbs": gbs,
            "frac_copy_bw": gbs / copy_gbs if copy_gbs else None, "tokens": float(case.tokens),
            "launches_per_call": launches}


def run(rec: Recorder, opts: SuiteOptions) -> dict[str, Any]:
    """Run the suite into ``rec``; returns its settings for the report."""
    device, quick = opts.device, opts.quick
    torch.manual_seed(0)
    copy_nbytes = (1 << 30) if device == "cuda" else (1 << 27)
    bw_row = rec.run(SUITE, "device copy", "copy", {"nbytes": copy_nbytes},
                     lambda: copy_bandwidth_gbs(device, copy_nbytes))
    copy_gbs = bw_row.metrics.get("copy_gbs") if bw_row.status == "ok" else None
    fns: dict[str, Callable[..., torch.Tensor] | Exception] = {}
    for impl in impls(device):
        try:
            fns[impl] = generator_fn(impl, device)
        except Exception as err:  # recorded on every row of this impl below
            fns[impl] = err
    for case in cases(device, quick):
        params = asdict(case)
        try:
            inp: dict[str, Any] | Exception = make_inputs(case, device)
        except Exception as err:  # e.g. out of memory: every row of the case fails with it
            inp = err
        for impl in impls(device):
            for mode in MODES:
                fn = fns[impl]
                broken = fn if isinstance(fn, Exception) else inp if isinstance(inp, Exception) else None
                if broken is not None:
                    rec.fail(SUITE, case.name, f"{impl}/{mode}", {**params, "impl": impl, "mode": mode},
                             f"{type(broken).__name__}: {broken}")
                    continue
                rec.run(SUITE, case.name, f"{impl}/{mode}", {**params, "impl": impl, "mode": mode},
                        lambda: measure(case, impl, mode, device, fn, copy_gbs, quick, inp))
        del inp
    return {
        "cases": [asdict(c) for c in cases(device, quick)],
        "impls": impls(device),
        "modes": list(MODES),
        "copy_nbytes": copy_nbytes,
        "timer": "triton.testing.do_bench (median, p10, p90 of CUDA-event times)" if device == "cuda"
                 else "perf_counter per call, repeated for >= 0.8 s (0.3 s in --quick): median, p10, p90",
        "notes": [
            "eager = iapt_fast.generator.reference.prompt_generator; compile = torch.compile of it, B and N marked "
            "dynamic (one graph per d, m, A and grad mode; its compile time is in first_call_s)",
            "CPU: cpu_fast = iapt_fast.generator.cpu_fast.prompt_generator (the library's CPU path); plain = the "
            "same math as a plain chain of matmuls (suites/kernels.py plain_pipeline), its yardstick",
            "triton = iapt_fast.kernels.triton_prompt_generator, called without the functional API's validation"
            if device == "cuda" else "CPU: no Triton rows (the interpreter is a correctness tool, not a backend)",
            "bytes = minimal DRAM traffic of the mode; frac_copy_bw = achieved GB/s over a measured "
            "device-to-device copy (2 bytes moved per byte copied)",
            "fwd runs under no_grad; bwd times autograd.grad of a retained graph; fwdbwd both",
            "launches_per_call: Triton kernel launches of one call (record_launches); fwd passes the cached "
            "W_down·W_pool, so the one-launch forward is 1 where kernels/launch.py picks it",
        ],
    }


def ratios(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The kernels suite's ratios: on CUDA, Triton's speed-up over eager and torch.compile and its
    fraction of copy bandwidth (targets at the fwd/bwd shapes of design.md §5); on the CPU, the library's
    CPU path against the plain matmul pipeline of the same math (≤ 1.5× in fwd) and eager, compile vs eager."""
    out: list[dict[str, Any]] = []
    k = index(rows, "kernels")
    kcases = list(dict.fromkeys(r["case"] for r in rows if r["suite"] == "kernels" and r["method"] != "copy"))
    for case in kcases:
        for mode in ("fwd", "bwd", "fwdbwd"):
            eager, comp, tri = (k.get((case, f"{impl}/{mode}")) for impl in ("eager", "compile", "triton"))
            if device == "cuda":
                params = (tri or eager or {}).get("params", {})
                big = params.get("d") == 4096 and params.get("batch", 0) * params.get("seq", 0) >= 16384
                t_eager = {"fwd": ("ge", 3.0), "bwd": ("ge", 2.0)}.get(mode)
                t_comp = ("ge", 1.5) if mode == "fwd" else None
                out.append(ratio(f"{mode}: Triton speed-up over eager", "kernels", case, tri, eager,
                                  "median_ms", t_eager, invert=True))
                out.append(ratio(f"{mode}: Triton speed-up over torch.compile", "kernels", case, tri, comp,
                                  "median_ms", t_comp, invert=True))
                out.append(value(f"{mode}: Triton fraction of copy bandwidth", "kernels", case, tri, "frac_copy_bw",
                                  ("ge", 0.8) if (mode == "fwd" and big) else None))
            else:
                fast, plain = (k.get((case, f"{impl}/{mode}")) for impl in ("cpu_fast", "plain"))
                out.append(ratio(f"{mode}: CPU path time over the plain matmul pipeline", "kernels", case, fast,
                                  plain, "median_ms", ("le", 1.5) if mode == "fwd" else None))
                out.append(ratio(f"{mode}: CPU path speed-up over eager", "kernels", case, fast, eager,
                                  "median_ms", None, invert=True))
                out.append(ratio(f"{mode}: torch.compile speed-up over eager", "kernels", case, comp, eager,
                                  "median_ms", None, invert=True))
                out.append(value(f"{mode}: eager fraction of copy bandwidth", "kernels", case, eager,
                                  "frac_copy_bw"))
    return out

"""End-to-end multi-tenant generation: base model vs IAPT vs three LoRA variants.

Every row of a batch is a different tenant (K = batch distinct adapters), except merged LoRA,
which serves one tenant with the adapter folded into the weights (the cost floor of LoRA).
Each (method, batch, prompt) is timed as greedy generate() of the whole batch:
    prefill_ms     generate(max_new_tokens=1): the prompt forward (IAPT: + its generators)
    decode_ms      (generate(n) − generate(1)) / (n − 1): one decode step of the whole batch
    tokens_per_s   batch · n / generate(n)
Every method runs the same generate() call of transformers, so its overheads are shared.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from suites import SuiteOptions
from suites.ratios import cases, index, ratio
from suites.common import (MEMORY_NOTE, Recorder, estimate_seconds, measure_memory, module_mb, quantiles,
                                      release_memory, time_calls)
from suites.models import LLAMA2_7B, METHOD_LABELS, BackboneSpec, Prepared, budget, \
    build_backbone, prepare

SUITE = "e2e"
DEFAULT_LORA_TARGETS = ["q_proj", "v_proj"]


def settings(device: str, quick: bool) -> dict[str, Any]:
    """Backbone, grid and repetitions for ``device``."""
    if device == "cuda":
        layers = 4 if quick else 8
        spec = BackboneSpec(f"Llama-2-7B-shaped, {layers} of its 32 layers", num_hidden_layers=layers, **LLAMA2_7B)
        return {"spec": spec, "dtype": "bfloat16", "batches": [1, 8] if quick else [1, 8, 32],
                "prompts": [128] if quick else [128, 512], "new_tokens": 16 if quick else 64, "reps": 2}
    if quick:
        spec = BackboneSpec("tiny Llama-shaped", hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, vocab_size=1024)
        return {"spec": spec, "dtype": "float32", "batches": [4], "prompts": [32], "new_tokens": 6, "reps": 2}
    spec = BackboneSpec("small Llama-shaped", hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=8, vocab_size=8192)
    return {"spec": spec, "dtype": "float32", "batches": [1, 8, 32], "prompts": [64], "new_tokens": 32, "reps": 5}


def count(opts: SuiteOptions) -> int:
    device, quick, methods = opts.device, opts.quick, list(opts.methods)
    s = settings(device, quick)
    return len(s["batches"]) * len(s["prompts"]) * len(methods)


class _Case:
    """Inputs and timings of one (batch, prompt) for every method, measured interleaved."""

    def __init__(self, batch: int, prompt: int, new_tokens: int, device: str, vocab: int) -> None:
        gen = torch.Generator().manual_seed(batch * 1000 + prompt)
        self.ids = torch.randint(2, vocab, (batch, prompt), generator=gen).to(device)
        self.mask = torch.ones_like(self.ids)
        self.batch, self.prompt, self.new_tokens, self.device = batch, prompt, new_tokens, device

    def generate(self, prep: Prepared, n: int) -> torch.Tensor:
        kwargs = prep.call_kwargs(self.batch)
        with torch.no_grad():
            out = prep.model.generate(input_ids=self.ids, attention_mask=self.mask, max_new_tokens=n,
                                      do_sample=False, **kwargs)
        seqs = out if isinstance(out, torch.Tensor) else out.sequences
        if tuple(seqs.shape) != (self.batch, self.prompt + n):
            raise RuntimeError(f"generate returned shape {tuple(seqs.shape)}, expected {(self.batch, self.prompt + n)}")
        return seqs


def time_generation(methods: list[str], generate: Callable[[str, int], Any], device: str, batch: int,
                    new_tokens: int, reps: int, failed: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Time ``generate(method, n)`` for n = 1 (prefill) and n = new_tokens, per method.

    Methods are interleaved (round r runs every method once, in a rotated order), so that
    load drifting on a shared machine spreads over all methods instead of biasing one. A method
    already in ``failed`` is skipped; one that raises is added to it.
    Returns the timings of every method that ran: prefill and total medians (p10, p90), decode
    ms per step = (total − prefill) / (n − 1), generated and decode tokens per second.
    """
    live = [m for m in methods if m not in failed]
    prefill: dict[str, list[float]] = {m: [] for m in live}
    full: dict[str, list[float]] = {m: [] for m in live}
    for r in range(reps):
        order = live[r % max(1, len(live)):] + live[: r % max(1, len(live))]
        for method in order:
            if method in failed:
                continue
            try:
                prefill[method].append(time_calls(device, lambda: generate(method, 1), 1).median_ms)
                full[method].append(time_calls(device, lambda: generate(method, new_tokens), 1).median_ms)
            except Exception as err:
                failed[method] = err
    out: dict[str, dict[str, float | None]] = {}
    for method in live:
        if method in failed:
            continue
        pre, tot = quantiles(prefill[method]), quantiles(full[method])
        decode_ms = (tot.median_ms - pre.median_ms) / max(1, new_tokens - 1)
        # On a loaded machine the difference of two medians can come out negative: that is
        # noise, and is reported as not measurable rather than as a number.
        decode_ms = decode_ms if decode_ms > 0 else None
        out[method] = {
            "prefill_ms": pre.median_ms, "prefill_p10_ms": pre.p10_ms, "prefill_p90_ms": pre.p90_ms,
            "total_ms": tot.median_ms, "total_p10_ms": tot.p10_ms, "total_p90_ms": tot.p90_ms,
            "decode_ms_per_token": decode_ms,
            "tokens_per_s": batch * new_tokens / (tot.median_ms * 1e-3),
            "decode_tokens_per_s": batch / (decode_ms * 1e-3) if decode_ms else None,
            "reps": float(reps),
        }
    return out


def measure_case(preps: dict[str, Prepared], case: _Case, reps: int) -> dict[str, dict[str, float | None] | Exception]:
    """Time every method on one case; returns metrics or the exception, per method."""
    results: dict[str, dict[str, float | None] | Exception] = {}
    memory: dict[str, dict[str, float | None]] = {}
    for method, prep in preps.items():
        try:
            # The warm-up call doubles as the memory measurement.
            memory[method] = measure_memory(case.device, lambda: case.generate(prep, case.new_tokens))
        except Exception as err:
            results[method] = err
    timings = time_generation(list(preps), lambda method, n: case.generate(preps[method], n), case.device,
                              case.batch, case.new_tokens, reps, results)
    for method, metrics in timings.items():
        prep = preps[method]
        results[method] = {
            **metrics, **_memory(prep, memory[method]),
            "distinct_adapters": float(prep.distinct_adapters(case.batch)),
            "adapters_loaded": float(len(prep.adapter_names)),
            "trainable_params_per_adapter": float(prep.trainable_params),
        }
    return results


def _memory(prep: Prepared, mem: dict[str, float | None]) -> dict[str, float | None]:
    weights = module_mb(prep.model)
    extra = mem["extra_mem_mb"]
    return {"weights_mb": weights, "extra_mem_mb": extra, "peak_mem_mb": None if extra is None else weights + extra,
            "process_peak_mb": mem["process_peak_mb"]}


def _info(cfg: dict[str, Any], spec: BackboneSpec, plan: dict[str, Any], methods: list[str], device: str,
          lora_targets: list[str]) -> dict[str, Any]:
    """The suite's settings for the report."""
    max_adapters = max(cfg["batches"])
    return {
        "backbone": spec.to_dict(), "dtype": cfg["dtype"], "batches": cfg["batches"], "prompts": cfg["prompts"],
        "new_tokens": cfg["new_tokens"], "reps": cfg["reps"], "budget": plan, "methods": methods,
        "method_labels": {m: METHOD_LABELS[m] for m in methods}, "adapters_loaded": max_adapters,
        "memory": MEMORY_NOTE["cuda" if device == "cuda" else "cpu"],
        "notes": [
            f"K = batch distinct adapters: row b uses tenant b; {max_adapters} adapters loaded per method",
            f"LoRA on {', '.join(lora_targets)} with rank {plan['lora_rank']} "
            f"({plan['lora_params']:,} params per adapter) vs IAPT m = {plan['iapt_bottleneck']}, "
            f"T = {plan['iapt_soft_tokens']} ({plan['iapt_params']:,} params per adapter)",
            "greedy decoding of exactly new_tokens tokens (EOS disabled); prompts without padding",
            "per case: one warm-up call per method (which also gives the memory figures), then reps "
            "rounds that run every method once, interleaved in rotating order; medians over the rounds",
        ],
    }


def _prepare_all(methods: list[str], backbone, max_adapters: int, plan: dict[str, Any]):
    """(prepared methods, build error per method that could not be built)."""
    preps: dict[str, Prepared] = {}
    build_errors: dict[str, str] = {}
    for method in methods:
        try:
            preps[method] = prepare(method, backbone, max_adapters if method != "merged_lora" else 1, plan,
                                    built=preps)
        except Exception as err:  # the method's rows are all failed, with the build error
            build_errors[method] = f"building {method}: {type(err).__name__}: {err}"
    return preps, build_errors


def run_grid(rec: Recorder, suite: str, grid: list[tuple[int, int]], new_tokens: int, methods: list[str],
             labels: dict[str, str], measure: Callable[[int, int], dict[str, Any]],
             build_errors: dict[str, str] | None = None) -> None:
    """Measure every (batch, prompt) of ``grid`` with ``measure(batch, prompt)`` (metrics or the
    exception, per method) while the recorder's budget lasts, and record one row per method:
    failed (``build_errors``: it could not be built), skipped (past the budget) or measured."""
    build_errors = build_errors or {}
    history: list[tuple[float, float]] = []  # (work, seconds) of the cases measured so far
    for b, p in grid:
        work = float(b * (p + new_tokens))
        reason = rec.budget.skip_reason(estimate_seconds(history, work))
        results: dict[str, Any] = {}
        seconds = 0.0
        if reason is None:
            start = time.perf_counter()
            try:
                results = measure(b, p)
            except Exception as err:  # e.g. the inputs could not be built: every method fails
                results = {m: err for m in methods}
            seconds = time.perf_counter() - start
            history.append((work, seconds))
        for method in methods:
            params = {"batch": b, "prompt": p, "new_tokens": new_tokens, "method_label": labels[method]}
            case = f"b{b} p{p}"
            if method in build_errors:
                rec.fail(suite, case, method, params, build_errors[method])
            elif reason is not None:
                rec.skip(suite, case, method, params, reason)
            else:
                # seconds: the whole case, every method interleaved
                rec.record(suite, case, method, params, results.get(method, RuntimeError("not measured")), seconds)


def run(rec: Recorder, opts: SuiteOptions) -> dict[str, Any]:
    """Run the suite into ``rec``; returns its settings for the report."""
    device, quick, methods, lora_targets = opts.device, opts.quick, list(opts.methods), list(opts.lora_targets)
    cfg = settings(device, quick)
    spec: BackboneSpec = cfg["spec"]
    plan = budget(spec, lora_targets)
    grid = [(b, p) for p in cfg["prompts"] for b in cfg["batches"]]
    info = _info(cfg, spec, plan, methods, device, lora_targets)
    try:
        start = time.perf_counter()
        backbone = build_backbone(spec, torch.device(device), getattr(torch, cfg["dtype"]))
        info["backbone_build_s"] = time.perf_counter() - start
        info["backbone_params"] = sum(p.numel() for p in backbone.parameters())
    except Exception as err:
        for method in methods:
            for b, p in grid:
                rec.fail(SUITE, f"b{b} p{p}", method, {"batch": b, "prompt": p}, f"backbone: {type(err).__name__}: {err}")
        return info
    preps, build_errors = _prepare_all(methods, backbone, max(cfg["batches"]), plan)
    run_grid(rec, SUITE, grid, cfg["new_tokens"], methods, METHOD_LABELS,
             lambda b, p: measure_case(preps, _Case(b, p, cfg["new_tokens"], device, spec.vocab_size), cfg["reps"]),
             build_errors)
    del preps
    release_memory()
    del backbone
    release_memory()
    return info


def ratios(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The e2e suite's ratios: IAPT against the base model and every LoRA at each case."""
    out: list[dict[str, Any]] = []
    e = index(rows, "e2e")
    for case in cases(rows, "e2e"):
        iapt, base = e.get((case, "iapt")), e.get((case, "base"))
        peft, bmm, merged = e.get((case, "peft_lora")), e.get((case, "bmm_lora")), e.get((case, "merged_lora"))
        out.append(ratio("IAPT / base tokens/s", "e2e", case, iapt, base, "tokens_per_s", ("ge", 0.95)))
        out.append(ratio("IAPT / PEFT LoRA mixed tokens/s", "e2e", case, iapt, peft, "tokens_per_s", ("ge", 1.3)))
        out.append(ratio("IAPT / gathered-BMM LoRA tokens/s", "e2e", case, iapt, bmm, "tokens_per_s", ("gt", 1.0)))
        out.append(ratio("IAPT / merged LoRA (1 tenant) tokens/s", "e2e", case, iapt, merged, "tokens_per_s"))
        out.append(ratio("IAPT prefill overhead over base", "e2e", case, iapt, base, "prefill_ms", ("le", 0.05),
                          minus_one=True))
        out.append(ratio("IAPT / base decode ms per token", "e2e", case, iapt, base, "decode_ms_per_token"))
        out.append(ratio("PEFT LoRA mixed / base tokens/s", "e2e", case, peft, base, "tokens_per_s"))
        single = e.get((case, "iapt_single"))
        if single is not None:
            out.append(ratio("IAPT K adapters / IAPT 1 adapter tokens/s", "e2e", case, iapt, single, "tokens_per_s",
                              ("ge", 0.95)))
        iapt_torch = e.get((case, "iapt_torch"))
        if iapt_torch is not None:
            out.append(ratio("IAPT Triton / IAPT reference tokens/s", "e2e", case, iapt, iapt_torch, "tokens_per_s"))
            out.append(ratio("IAPT Triton / IAPT reference prefill speed-up", "e2e", case, iapt, iapt_torch,
                              "prefill_ms", invert=True))
    return out

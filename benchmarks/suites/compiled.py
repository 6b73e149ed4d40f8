"""Generation on the fast path: a static KV cache and a compiled decode step, base vs IAPT.

This is the path transformers takes on a GPU for fast decoding: ``generate(cache_implementation=
"static")``, whose decode step generate() compiles (torch.compile; ``"reduce-overhead"``, i.e.
CUDA graphs, on CUDA; ``"default"`` elsewhere, see ``iapt_fast.compat.decode_compile_config``).

Methods (one base model and one IAPT model with K adapters, row b on tenant b):
    base_static, iapt_static        static cache, eager decode steps
    base_compiled, iapt_compiled    static cache, compiled decode step
Timed as in the e2e suite: prefill = generate(max_new_tokens=1), total = generate(n), decode
per step = (total − prefill) / (n − 1). The cache is sized once per case (``max_cache_len``),
so both calls run one compiled graph; its compilation happens in the warm-up call (reported
as ``first_call_s``). Before timing, every compiled method must give its model's eager
tokens, or its row fails: wrong code is never timed.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from suites import SuiteOptions
from suites.ratios import cases, index, ratio
from suites.common import Recorder, release_memory
from suites.e2e import run_grid, settings as e2e_settings, time_generation
from suites.models import BackboneSpec, Prepared, budget, build_backbone, prepare

SUITE = "compiled"
METHODS = ("base_static", "iapt_static", "base_compiled", "iapt_compiled")
METHOD_LABELS = {
    "base_static": "base model, static cache",
    "iapt_static": "IAPT, K adapters, static cache",
    "base_compiled": "base model, static cache, compiled decode step",
    "iapt_compiled": "IAPT, K adapters, static cache, compiled decode step",
}
# Every (model, batch) compiles its own decode graph; torch's default of 8 graphs per code
# object would make later cases silently fall back to eager.
RECOMPILE_LIMIT = 64


def settings(device: str, quick: bool) -> dict[str, Any]:
    """The e2e suite's backbone; fewer cases (each compiles a graph per model)."""
    base = e2e_settings(device, quick)
    if device == "cuda":
        batches = [1, 8] if quick else [1, 8, 32]
        return {**base, "batches": batches, "prompts": [128], "new_tokens": 16 if quick else 64, "reps": 3}
    if quick:
        return {**base, "batches": [4], "prompts": [32], "new_tokens": 8, "reps": 2}
    return {**base, "batches": [1, 8], "prompts": [64], "new_tokens": 32, "reps": 3}


def count(opts: SuiteOptions) -> int:
    device, quick = opts.device, opts.quick
    s = settings(device, quick)
    return len(s["batches"]) * len(s["prompts"]) * len(METHODS)


def _set_recompile_limit() -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name first
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            return


class _Case:
    def __init__(self, batch: int, prompt: int, new_tokens: int, device: str, vocab: int) -> None:
        gen = torch.Generator().manual_seed(batch * 1000 + prompt + 7)
        self.ids = torch.randint(2, vocab, (batch, prompt), generator=gen).to(device)
        self.mask = torch.ones_like(self.ids)
        self.batch, self.prompt, self.new_tokens, self.device = batch, prompt, new_tokens, device

    def generate(self, prep: Prepared, compiled: bool, n: int) -> torch.Tensor:
        from iapt_fast.compat import decode_compile_config

        kwargs = prep.call_kwargs(self.batch)
        if compiled:
            kwargs["compile_config"] = decode_compile_config(self.device)
        else:
            kwargs["disable_compile"] = True  # on CUDA, generate() would compile a static cache by itself
        with torch.no_grad():
            out = prep.model.generate(input_ids=self.ids, attention_mask=self.mask, max_new_tokens=n,
                                      do_sample=False, cache_implementation="static",
                                      max_cache_len=self.prompt + self.new_tokens, **kwargs)
        if tuple(out.shape) != (self.batch, self.prompt + n):
            raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected {(self.batch, self.prompt + n)}")
        return out


def _method(name: str) -> tuple[str, bool]:
    """(model: base | iapt, compiled?)."""
    model, _, mode = name.partition("_")
    return model, mode == "compiled"


def measure_case(preps: dict[str, Prepared], case: _Case, methods: list[str],
                 reps: int) -> dict[str, dict[str, float | None] | Exception]:
    """Warm up (compiling) and check each method, then time them as the e2e suite does."""
    results: dict[str, dict[str, float | None] | Exception] = {}
    first_call: dict[str, float] = {}
    eager_tokens: dict[str, torch.Tensor] = {}
    for method in methods:
        model, compiled = _method(method)
        try:
            start = time.perf_counter()
            tokens = case.generate(preps[model], compiled, case.new_tokens)
            first_call[method] = time.perf_counter() - start
            if not compiled:
                eager_tokens[model] = tokens
            elif model in eager_tokens and not torch.equal(tokens, eager_tokens[model]):
                raise RuntimeError(f"{method}: the compiled decode step gives other tokens than the eager one "
                                   f"({int((tokens != eager_tokens[model]).sum())} differ)")
        except Exception as err:
            results[method] = err
    timings = time_generation(methods, lambda method, n: case.generate(preps[_method(method)[0]], _method(method)[1], n),
                              case.device, case.batch, case.new_tokens, reps, results)
    for method, metrics in timings.items():
        results[method] = {**metrics, "first_call_s": first_call[method],
                           "distinct_adapters": float(preps[_method(method)[0]].distinct_adapters(case.batch))}
    return results


def run(rec: Recorder, opts: SuiteOptions) -> dict[str, Any]:
    """Run the suite into ``rec``; returns its settings for the report."""
    device, quick, lora_targets = opts.device, opts.quick, list(opts.lora_targets)
    cfg = settings(device, quick)
    spec: BackboneSpec = cfg["spec"]
    plan = budget(spec, lora_targets)
    methods = list(METHODS)
    grid = [(b, p) for p in cfg["prompts"] for b in cfg["batches"]]
    mode = "reduce-overhead (CUDA graphs)" if device == "cuda" else "default (inductor)"
    info = {"backbone": spec.to_dict(), "dtype": cfg["dtype"], "batches": cfg["batches"], "prompts": cfg["prompts"],
            "new_tokens": cfg["new_tokens"], "reps": cfg["reps"], "methods": methods, "method_labels": METHOD_LABELS,
            "adapters_loaded": max(cfg["batches"]), "compile_mode": mode,
            "notes": [f"decode step compiled by generate(compile_config=...), mode {mode}, fullgraph=True",
                      f"IAPT m = {plan['iapt_bottleneck']}, T = {plan['iapt_soft_tokens']}; row b on tenant b",
                      "per case: a warm-up call per method (compiles; checked against the eager tokens), then "
                      "reps interleaved rounds; medians over the rounds"]}
    _set_recompile_limit()
    torch._dynamo.reset()
    start = time.perf_counter()
    preps: dict[str, Prepared] = {}
    try:
        backbone = build_backbone(spec, torch.device(device), getattr(torch, cfg["dtype"]))
        info["backbone_build_s"] = time.perf_counter() - start
        for model in ("base", "iapt"):
            preps[model] = prepare(model, backbone, max(cfg["batches"]), plan)
    except Exception as err:
        for method in methods:
            for b, p in grid:
                rec.fail(SUITE, f"b{b} p{p}", method, {"batch": b, "prompt": p}, f"setup: {type(err).__name__}: {err}")
        return info
    run_grid(rec, SUITE, grid, cfg["new_tokens"], methods, METHOD_LABELS,
             lambda b, p: measure_case(preps, _Case(b, p, cfg["new_tokens"], device, spec.vocab_size), methods,
                                       cfg["reps"]))
    del preps, backbone
    torch._dynamo.reset()
    release_memory()
    return info


def ratios(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The compiled suite's ratios: IAPT against the base model, static cache eager and compiled."""
    out: list[dict[str, Any]] = []
    c = index(rows, "compiled")
    for case in cases(rows, "compiled"):
        for mode, target in (("compiled", ("ge", 0.95)), ("static", None)):
            iapt, base = c.get((case, f"iapt_{mode}")), c.get((case, f"base_{mode}"))
            out.append(ratio(f"{mode}: IAPT / base decode tokens/s", "compiled", case, iapt, base,
                              "decode_tokens_per_s", target))
            out.append(ratio(f"{mode}: IAPT / base tokens/s", "compiled", case, iapt, base, "tokens_per_s"))
        for model in ("base", "iapt"):
            out.append(ratio(f"{model}: compiled / eager decode speed-up", "compiled", case, c.get((case, f"{model}_static")),
                              c.get((case, f"{model}_compiled")), "decode_ms_per_token"))
    return out

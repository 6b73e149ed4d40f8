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
from typing import Any

import torch

from benchmarks.suites.common import MEMORY_NOTE, Recorder, peak_memory, release_memory, time_calls
from benchmarks.suites.models import LLAMA2_7B, METHOD_LABELS, METHODS, BackboneSpec, Prepared, budget, \
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
        return {"spec": spec, "dtype": "float32", "batches": [4], "prompts": [32], "new_tokens": 6, "reps": 1}
    spec = BackboneSpec("small Llama-shaped", hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=8, vocab_size=8192)
    return {"spec": spec, "dtype": "float32", "batches": [1, 8], "prompts": [128], "new_tokens": 16, "reps": 3}


def count(device: str, quick: bool, methods: list[str]) -> int:
    s = settings(device, quick)
    return len(s["batches"]) * len(s["prompts"]) * len(methods)


def measure(prep: Prepared, batch: int, prompt: int, new_tokens: int, reps: int, device: str,
            vocab: int) -> dict[str, float | None]:
    """Time generate() of one (batch, prompt) for a prepared method."""
    gen = torch.Generator().manual_seed(batch * 1000 + prompt)
    ids = torch.randint(2, vocab, (batch, prompt), generator=gen).to(device)
    mask = torch.ones_like(ids)
    kwargs = prep.call_kwargs(batch)

    def generate(n: int) -> torch.Tensor:
        with torch.no_grad():
            out = prep.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                      **kwargs)
        seqs = out if isinstance(out, torch.Tensor) else out.sequences
        if tuple(seqs.shape) != (batch, prompt + n):
            raise RuntimeError(f"generate returned shape {tuple(seqs.shape)}, expected {(batch, prompt + n)}")
        return seqs

    with peak_memory(device) as mem:  # the warm-up call doubles as the memory measurement
        generate(new_tokens)
    prefill = time_calls(device, lambda: generate(1), reps)
    full = time_calls(device, lambda: generate(new_tokens), reps)
    decode_ms = (full.median_ms - prefill.median_ms) / max(1, new_tokens - 1)
    return {
        "prefill_ms": prefill.median_ms, "prefill_p10_ms": prefill.p10_ms, "prefill_p90_ms": prefill.p90_ms,
        "total_ms": full.median_ms, "total_p10_ms": full.p10_ms, "total_p90_ms": full.p90_ms,
        "decode_ms_per_token": decode_ms,
        "tokens_per_s": batch * new_tokens / (full.median_ms * 1e-3),
        "decode_tokens_per_s": batch / (decode_ms * 1e-3) if decode_ms > 0 else None,
        "peak_mem_mb": mem["peak_mem_mb"], "extra_mem_mb": mem["extra_mem_mb"],
        "distinct_adapters": float(prep.distinct_adapters(batch)),
        "adapters_loaded": float(len(prep.adapter_names)),
        "trainable_params_per_adapter": float(prep.trainable_params),
        "reps": float(reps),
    }


def run(rec: Recorder, device: str, quick: bool, methods: list[str], lora_targets: list[str]) -> dict[str, Any]:
    """Run the suite into ``rec``; returns its settings for the report."""
    cfg = settings(device, quick)
    spec: BackboneSpec = cfg["spec"]
    plan = budget(spec, lora_targets)
    dtype = getattr(torch, cfg["dtype"])
    grid = [(b, p) for p in cfg["prompts"] for b in cfg["batches"]]
    max_adapters = max(cfg["batches"])
    info = {
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
            "median of reps timed calls after one warm-up call (which also gives the memory figures)",
        ],
    }
    try:
        start = time.perf_counter()
        backbone = build_backbone(spec, torch.device(device), dtype)
        info["backbone_build_s"] = time.perf_counter() - start
        info["backbone_params"] = sum(p.numel() for p in backbone.parameters())
    except Exception as err:
        for method in methods:
            for b, p in grid:
                rec.fail(SUITE, f"b{b} p{p}", method, {"batch": b, "prompt": p}, f"backbone: {type(err).__name__}: {err}")
        return info
    for method in methods:
        prep: Prepared | None = None
        build_error: str | None = None
        try:
            prep = prepare(method, backbone, max_adapters if method != "merged_lora" else 1, plan)
        except Exception as err:  # the method's rows are all failed, with the build error
            build_error = f"building {method}: {type(err).__name__}: {err}"
        for b, p in grid:
            params = {"batch": b, "prompt": p, "new_tokens": cfg["new_tokens"], "method_label": METHOD_LABELS[method]}
            if prep is None:
                rec.fail(SUITE, f"b{b} p{p}", method, params, build_error or "build failed")
                continue
            rec.run(SUITE, f"b{b} p{p}", method, params,
                    lambda: measure(prep, b, p, cfg["new_tokens"], cfg["reps"], device, spec.vocab_size))
        del prep
        release_memory()
    del backbone
    release_memory()
    return info

"""Training step: IAPT vs LoRA at a comparable trainable-parameter budget.

One step = forward with labels, backward, AdamW step, zero_grad, on a frozen backbone with
one trainable adapter. The first half of every sequence is the instruction (IAPT pools over
it; labels are -100 there), the second half the response. Reported: step latency, trained
tokens per second (batch · sequence / step) and peak memory.
"""
from __future__ import annotations

from typing import Any

import torch

from benchmarks.suites.common import MEMORY_NOTE, Recorder, peak_memory, release_memory, time_calls
from benchmarks.suites.e2e import settings as e2e_settings
from benchmarks.suites.models import LLAMA2_7B, BackboneSpec, Prepared, budget, build_backbone, prepare

SUITE = "train"
METHODS = ("iapt", "peft_lora", "bmm_lora")


def settings(device: str, quick: bool) -> dict[str, Any]:
    if device == "cuda":
        layers = 2 if quick else 4
        spec = BackboneSpec(f"Llama-2-7B-shaped, {layers} of its 32 layers", num_hidden_layers=layers, **LLAMA2_7B)
        return {"spec": spec, "dtype": "bfloat16", "shapes": [(8, 512)] if quick else [(8, 512), (4, 2048)],
                "warmup": 2, "steps": 3 if quick else 5}
    spec = e2e_settings(device, quick)["spec"]
    return {"spec": spec, "dtype": "float32", "shapes": [(2, 32)] if quick else [(4, 128)],
            "warmup": 1, "steps": 2 if quick else 4}


def count(device: str, quick: bool) -> int:
    return len(settings(device, quick)["shapes"]) * len(METHODS)


def _batch(batch: int, seq: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch * 7 + seq)
    ids = torch.randint(2, vocab, (batch, seq), generator=gen).to(device)
    instruction = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    instruction[:, : seq // 2] = True
    labels = ids.masked_fill(instruction, -100)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "instruction_mask": instruction}


def measure(prep: Prepared, batch: int, seq: int, steps: int, warmup: int, device: str, vocab: int) -> dict[str, float | None]:
    data = _batch(batch, seq, vocab, device)
    if prep.method == "iapt":
        inputs = data
    else:
        inputs = {k: v for k, v in data.items() if k != "instruction_mask"}
        prep.call_kwargs(batch)  # bmm_lora: one adapter loaded, so every row on it (no gather)
    prep.model.train()
    params = [p for p in prep.model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"{prep.method}: no trainable parameters")
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        loss = prep.model(**inputs).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{prep.method}: non-finite loss {loss.item()}")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup - 1):
        step()
    with peak_memory(device) as mem:  # the last warm-up step: optimizer state already allocated
        step()
    timing = time_calls(device, step, steps)
    return {
        "step_ms": timing.median_ms, "step_p10_ms": timing.p10_ms, "step_p90_ms": timing.p90_ms,
        "tokens_per_s": batch * seq / (timing.median_ms * 1e-3),
        "peak_mem_mb": mem["peak_mem_mb"], "extra_mem_mb": mem["extra_mem_mb"],
        "trainable_params": float(sum(p.numel() for p in params)), "steps": float(steps),
    }


def run(rec: Recorder, device: str, quick: bool, lora_targets: list[str]) -> dict[str, Any]:
    cfg = settings(device, quick)
    spec: BackboneSpec = cfg["spec"]
    plan = budget(spec, lora_targets)
    info = {"backbone": spec.to_dict(), "dtype": cfg["dtype"], "shapes": cfg["shapes"], "steps": cfg["steps"],
            "warmup": cfg["warmup"], "budget": plan, "methods": list(METHODS),
            "memory": MEMORY_NOTE["cuda" if device == "cuda" else "cpu"],
            "notes": ["one trainable adapter on a frozen backbone; AdamW; first half of each sequence is "
                      "the instruction, labels on the second half",
                      f"LoRA rank {plan['lora_rank']} on {', '.join(lora_targets)} "
                      f"({plan['lora_params']:,} params) vs IAPT ({plan['iapt_params']:,} params)",
                      "trainable parameters stay float32 in PEFT; IAPT keeps what the integration chooses"]}
    try:
        backbone = build_backbone(spec, torch.device(device), getattr(torch, cfg["dtype"]))
    except Exception as err:
        for method in METHODS:
            for b, s in cfg["shapes"]:
                rec.fail(SUITE, f"b{b} s{s}", method, {"batch": b, "seq": s}, f"backbone: {type(err).__name__}: {err}")
        return info
    for method in METHODS:
        for b, s in cfg["shapes"]:
            params = {"batch": b, "seq": s}

            def case(method: str = method, b: int = b, s: int = s) -> dict[str, float | None]:
                prep = prepare(method, backbone, 1, plan, trainable=True)
                try:
                    return measure(prep, b, s, cfg["steps"], cfg["warmup"], device, spec.vocab_size)
                finally:
                    del prep
                    release_memory()
            rec.run(SUITE, f"b{b} s{s}", method, params, case)
    del backbone
    release_memory()
    return info

"""Training step: IAPT vs LoRA at a comparable trainable-parameter budget.

One step = forward with labels, backward, AdamW step, zero_grad, on a frozen backbone with
one trainable adapter. The first half of every sequence is the instruction (IAPT pools over
it; labels are -100 there), the second half the response. Reported: step latency, trained
tokens per second (batch · sequence / step) and peak memory.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from suites import SuiteOptions
from suites.ratios import cases, index, ratio
from suites.common import MEMORY_NOTE, Recorder, measure_memory, module_mb, quantiles, release_memory, time_calls
from suites.e2e import settings as e2e_settings
from suites.models import LLAMA2_7B, BackboneSpec, Prepared, budget, build_backbone, prepare

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
            "warmup": 1, "steps": 2 if quick else 6}


def count(opts: SuiteOptions) -> int:
    device, quick = opts.device, opts.quick
    return len(settings(device, quick)["shapes"]) * len(METHODS)


def _batch(batch: int, seq: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch * 7 + seq)
    ids = torch.randint(2, vocab, (batch, seq), generator=gen).to(device)
    instruction = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    instruction[:, : seq // 2] = True
    labels = ids.masked_fill(instruction, -100)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "instruction_mask": instruction}


class _Trainer:
    """One method's model, optimizer and batch; ``step()`` is one training step."""

    def __init__(self, prep: Prepared, batch: int, seq: int, device: str, vocab: int) -> None:
        data = _batch(batch, seq, vocab, device)
        if prep.method != "iapt":
            data.pop("instruction_mask")
            prep.call_kwargs(batch)  # bmm_lora: one adapter loaded, so every row on it (no gather)
        prep.model.train()
        self.params = [p for p in prep.model.parameters() if p.requires_grad]
        if not self.params:
            raise RuntimeError(f"{prep.method}: no trainable parameters")
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.prep, self.inputs, self.device = prep, data, device

    def step(self) -> float:
        loss = self.prep.model(**self.inputs).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.prep.method}: non-finite loss {loss.item()}")
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def measure_case(preps: dict[str, Prepared], batch: int, seq: int, steps: int, warmup: int, device: str,
                 vocab: int) -> dict[str, dict[str, float | None] | Exception]:
    """Warm up every method, then time ``steps`` rounds of one step per method, interleaved."""
    results: dict[str, dict[str, float | None] | Exception] = {}
    trainers: dict[str, _Trainer] = {}
    memory: dict[str, dict[str, float | None]] = {}
    for method, prep in preps.items():
        try:
            trainer = _Trainer(prep, batch, seq, device, vocab)
            # The first step allocates gradients and optimizer state: it holds the peak.
            memory[method] = measure_memory(device, trainer.step)
            for _ in range(warmup - 1):
                trainer.step()
            trainers[method] = trainer
        except Exception as err:
            results[method] = err
    samples: dict[str, list[float]] = {m: [] for m in trainers}
    for r in range(steps):
        live = [m for m in trainers if m not in results]
        order = live[r % max(1, len(live)):] + live[: r % max(1, len(live))]
        for method in order:
            try:
                samples[method].append(time_calls(device, trainers[method].step, 1).median_ms)
            except Exception as err:
                results[method] = err
    for method, trainer in trainers.items():
        if method in results:
            continue
        timing = quantiles(samples[method])
        weights = module_mb(trainer.prep.model)
        extra = memory[method]["extra_mem_mb"]
        results[method] = {
            "step_ms": timing.median_ms, "step_p10_ms": timing.p10_ms, "step_p90_ms": timing.p90_ms,
            "tokens_per_s": batch * seq / (timing.median_ms * 1e-3),
            "weights_mb": weights, "extra_mem_mb": extra, "peak_mem_mb": None if extra is None else weights + extra,
            "process_peak_mb": memory[method]["process_peak_mb"],
            "trainable_params": float(sum(p.numel() for p in trainer.params)), "steps": float(steps),
        }
    return results


def run(rec: Recorder, opts: SuiteOptions) -> dict[str, Any]:
    device, quick, lora_targets = opts.device, opts.quick, list(opts.lora_targets)
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
    for b, s in cfg["shapes"]:
        preps: dict[str, Prepared] = {}
        results: dict[str, Any] = {}
        reason = rec.budget.skip_reason()
        seconds = 0.0
        if reason is None:
            start = time.perf_counter()
            for method in METHODS:
                try:
                    preps[method] = prepare(method, backbone, 1, plan, trainable=True)
                except Exception as err:
                    results[method] = RuntimeError(f"building {method}: {type(err).__name__}: {err}")
            try:
                results.update(measure_case(preps, b, s, cfg["steps"], cfg["warmup"], device, spec.vocab_size))
            except Exception as err:
                results.update({m: err for m in preps})
            seconds = time.perf_counter() - start
        for method in METHODS:
            params = {"batch": b, "seq": s}
            if reason is not None:
                rec.skip(SUITE, f"b{b} s{s}", method, params, reason)
            else:
                rec.record(SUITE, f"b{b} s{s}", method, params, results.get(method, RuntimeError("not measured")),
                           seconds)
        del preps
        release_memory()
    del backbone
    release_memory()
    return info


def ratios(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The train suite's ratios: a training step of IAPT against PEFT and gathered-BMM LoRA."""
    out: list[dict[str, Any]] = []
    t = index(rows, "train")
    for case in cases(rows, "train"):
        iapt, peft, bmm = t.get((case, "iapt")), t.get((case, "peft_lora")), t.get((case, "bmm_lora"))
        out.append(ratio("train: IAPT / PEFT LoRA tokens/s", "train", case, iapt, peft, "tokens_per_s"))
        out.append(ratio("train: IAPT / gathered-BMM LoRA tokens/s", "train", case, iapt, bmm, "tokens_per_s"))
        out.append(ratio("train: IAPT / PEFT LoRA peak memory", "train", case, iapt, peft, "peak_mem_mb"))
    return out

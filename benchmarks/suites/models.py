"""Backbones and adapters of the end-to-end and training suites.

Random-weight Llama-shaped models built from configs (no hub downloads), and one builder per
method: base, IAPT with K adapters, PEFT LoRA with K adapters (mixed batches through
``adapter_names=``), the gathered-BMM LoRA of benchmarks/lora_bmm.py, and merged LoRA.
LoRA ranks are chosen so that one LoRA adapter has about the trainable-parameter count of
one IAPT adapter on the same backbone.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lora_bmm import GatheredLoRA, attach_gathered_lora

METHODS = ("base", "iapt", "iapt_single", "iapt_torch", "peft_lora", "bmm_lora", "merged_lora")
# iapt_torch (IAPT with the PyTorch reference generator) differs from iapt only where "auto"
# picks the Triton kernels, i.e. on CUDA; on the CPU it would time the same code twice.
DEFAULT_METHODS = {"cuda": METHODS, "cpu": tuple(m for m in METHODS if m != "iapt_torch")}
METHOD_LABELS = {
    "base": "base model",
    "iapt": "IAPT, K adapters",
    "iapt_single": "IAPT, K adapters loaded, every row on one",
    "iapt_torch": "IAPT, K adapters, reference generator (no Triton)",
    "peft_lora": "PEFT LoRA mixed batch, K adapters",
    "bmm_lora": "gathered-BMM LoRA, K adapters",
    "merged_lora": "merged LoRA, 1 tenant",
}


@dataclass
class BackboneSpec:
    """A Llama-shaped decoder. ``name`` says what it imitates."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 4096

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Llama-2-7B's layer shapes; the layer count is the caller's (fewer layers keep the GPU run short).
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)


def build_backbone(spec: BackboneSpec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A randomly initialised LlamaForCausalLM in eval mode, EOS disabled (fixed-length decoding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings, pad_token_id=0, bos_token_id=1,
        eos_token_id=None, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    model.requires_grad_(False)
    gen = model.generation_config
    gen.eos_token_id = None
    gen.pad_token_id = 0
    gen.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        if hasattr(gen, key):
            setattr(gen, key, None)
    return model


# ---------------------------------------------------------------------------- budgets

def lora_width_per_layer(spec: BackboneSpec, targets: list[str]) -> int:
    """Σ (in + out) over the LoRA target linears of one layer: LoRA params per layer = r · this."""
    d, ff = spec.hidden_size, spec.intermediate_size
    kv = spec.hidden_size // spec.num_attention_heads * spec.num_key_value_heads
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
              "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown LoRA target modules {unknown}; expected some of {sorted(shapes)}")
    return sum(sum(shapes[t]) for t in targets)


def budget(spec: BackboneSpec, targets: list[str], bottleneck: int | None = None,
           num_tokens: int = 4) -> dict[str, Any]:
    """IAPT's trainable parameters per adapter and the LoRA rank closest to that budget."""
    from iapt_fast import IAPTConfig

    cfg = IAPTConfig(num_soft_tokens=num_tokens, bottleneck_dim=bottleneck)
    m = cfg.resolved_bottleneck(spec.hidden_size)
    iapt = cfg.num_parameters(spec.hidden_size, spec.num_hidden_layers)
    width = lora_width_per_layer(spec, targets) * spec.num_hidden_layers
    rank = max(1, round(iapt / width))
    return {"iapt_bottleneck": m, "iapt_soft_tokens": num_tokens, "iapt_params": iapt,
            "lora_targets": list(targets), "lora_rank": rank, "lora_params": rank * width,
            "lora_params_over_iapt": rank * width / iapt}


# ---------------------------------------------------------------------------- methods
@dataclass
class Prepared:
    """A model ready for one method; ``call_kwargs(batch)`` gives the extra generate/forward kwargs."""

    method: str
    model: Any
    adapter_names: list[str]
    lora_handle: GatheredLoRA | None = None
    trainable_params: int = 0

    def distinct_adapters(self, batch: int) -> int:
        """Distinct adapters serving a batch of ``batch`` rows."""
        if self.method == "base":
            return 0
        if self.method == "iapt_single":
            return 1
        return min(batch, len(self.adapter_names))

    def call_kwargs(self, batch: int) -> dict[str, Any]:
        """Row b uses tenant b mod K (every row a different adapter when K = batch)."""
        k = len(self.adapter_names)
        if self.method in ("iapt", "iapt_torch", "peft_lora"):
            return {"adapter_names": [self.adapter_names[b % k] for b in range(batch)]}
        if self.method == "iapt_single":
            return {"adapter_names": [self.adapter_names[0]] * batch}
        if self.method == "bmm_lora":
            assert self.lora_handle is not None
            device = next(iter(self.lora_handle.layers.values())).lora_a.device
            self.lora_handle.set_adapter_ids(torch.arange(batch, device=device) % k)
        return {}


def prepare(method: str, backbone: nn.Module, num_adapters: int, plan: dict[str, Any],
            trainable: bool = False, built: dict[str, Prepared] | None = None) -> Prepared:
    """Build ``method`` on a deep copy of ``backbone`` (the backbone itself stays untouched).

    ``built``: methods prepared already; iapt_single reuses iapt's model (same weights and
    adapters, only the rows' adapter names differ) instead of a second copy.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "iapt_single" and built and "iapt" in built:
        src = built["iapt"]
        return Prepared(method, src.model, src.adapter_names, trainable_params=src.trainable_params)
    model = copy.deepcopy(backbone)
    names = [f"tenant_{i}" for i in range(num_adapters)]
    if method == "base":
        return Prepared(method, model, [])
    if method in ("iapt", "iapt_single", "iapt_torch"):
        return _prepare_iapt(model, names, plan, trainable, backend="torch" if method == "iapt_torch" else "auto",
                             method=method)
    if method == "bmm_lora":
        handle = attach_gathered_lora(model, plan["lora_targets"], num_adapters, plan["lora_rank"])
        if not trainable:
            for layer in handle.layers.values():
                layer.lora_a.requires_grad_(False)
                layer.lora_b.requires_grad_(False)
        return Prepared(method, model, names, handle, handle.trainable_parameters() // num_adapters)
    from peft import LoraConfig, get_peft_model

    lora_cfg = LoraConfig(r=plan["lora_rank"], lora_alpha=2 * plan["lora_rank"], lora_dropout=0.0,
                          target_modules=list(plan["lora_targets"]), init_lora_weights=False,
                          bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora_cfg, adapter_name=names[0])
    if method == "merged_lora":
        merged = peft_model.merge_and_unload()
        merged.eval()
        return Prepared(method, merged, names[:1], trainable_params=plan["lora_params"])  # before merging
    for name in names[1:]:
        peft_model.add_adapter(name, lora_cfg)
    trainable_params = sum(p.numel() for n, p in peft_model.named_parameters()
                           if "lora_" in n and f".{names[0]}." in n)
    if trainable:
        peft_model.set_adapter(names[0])
    else:
        peft_model.eval()
        peft_model.requires_grad_(False)
    return Prepared(method, peft_model, names, trainable_params=trainable_params)


def _prepare_iapt(model: nn.Module, names: list[str], plan: dict[str, Any], trainable: bool,
                  backend: str = "auto", method: str = "iapt") -> Prepared:
    from iapt_fast import IAPTConfig
    try:
        from iapt_fast import get_iapt_model
    except ImportError as err:
        raise RuntimeError(f"IAPT integration unavailable: {err}") from err

    cfg = IAPTConfig(num_soft_tokens=plan["iapt_soft_tokens"], bottleneck_dim=plan["iapt_bottleneck"])
    iapt_model = get_iapt_model(model, cfg, adapter_name=names[0], backend=backend, seed=0)
    for i, name in enumerate(names[1:], start=1):
        iapt_model.add_adapter(name, cfg, seed=i)
    per_adapter = sum(p.numel() for p in iapt_model.generators[names[0]].parameters())
    if trainable:
        iapt_model.set_adapter(names[0])  # the only trainable one
    else:
        iapt_model.eval()
        iapt_model.requires_grad_(False)
    return Prepared(method, iapt_model, names, trainable_params=per_adapter)

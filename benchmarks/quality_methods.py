"""The quality report's methods: what each trains (PEFT baselines, IAPT's forms and ablations),
its default learning rate and its label; :func:`build_method` makes one on a fresh backbone.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from quality_tasks import Task

__all__ = ["DEFAULT_LR", "DEFAULTS_METHOD", "IAPT_ABLATIONS", "RUN_RECIPE", "TRAIN_OVERRIDES", "MAIN_METHODS", "METHODS", "METHOD_LABELS",
           "count_trainable", "iapt_config", "iapt_param_count", "lora_rank_for", "build_method"]

# Default learning rates: the usual choice of each method's literature / PEFT examples; the
# sweep multiplies them by --tune-factors.
DEFAULT_LR = {"prompt_tuning": 3e-2, "prefix_tuning": 3e-3, "lora": 1e-3, "iapt_paper": 1e-3, "iapt": 1e-3}


# Ablations of the library defaults: one choice changed each (what the report's recipe rests on).
IAPT_ABLATIONS = {
    "iapt_text_init": dict(anchor_init="text"),      # the task's init text instead of T × BOS
    "iapt_unscaled": dict(anchor_scaled=False),      # s = 1 instead of RMS(anchor)
    "iapt_hidden_pool": dict(pool_input="hidden"),   # pool the raw residual stream
    "iapt_up_0.1": dict(init_std_up=0.1),            # a 5× larger start of the generator term
    "iapt_anchors_only": dict(anchors_only=True),    # the generator term off: a static deep prompt
    "iapt_t8": dict(num_soft_tokens=8),              # 2× the soft tokens (more parameters: T·(d + m) per layer)
    "iapt_t16": dict(num_soft_tokens=16),            # 4× the soft tokens
    "iapt_t16_m39": dict(num_soft_tokens=16, bottleneck_dim=39),  # T = 16 at the defaults' budget (m 45 → 39)
    "iapt_top_half": dict(target_layers="top_half"),  # soft tokens in the upper half of the layers only
    "iapt_lr3e-3": {},                               # lr 3e-3, W_pool at the LR (the defaults before iapt_pool_lr3)
    "iapt_bilevel": {},                              # the paper's bi-level training (TRAIN_OVERRIDES)
    "iapt_anchor_lr": {},                            # the anchors at anchors-only's LR (TRAIN_OVERRIDES)
    "iapt_cosine": {},                               # cosine decay instead of linear (TRAIN_OVERRIDES)
    "iapt_pool_lr": {},                              # sharper pooling: W_pool at 10× the LR (TRAIN_OVERRIDES)
    "iapt_pool_lr3": {},                             # the library defaults: lr 3e-3, W_pool at 3× the LR
}

# One change each to the library defaults (W_pool at 3× the LR, lr 3e-3), where a task trails LoRA.
DEFAULTS_ABLATIONS = {
    "iapt_dot_anchor": dict(anchor_init="text", prompt_init_text="."),  # anchors from T × "." (a neutral start)
    "iapt_d_text_init": dict(anchor_init="text"),                      # anchors from the task's init text
    "iapt_d_t8_m43": dict(num_soft_tokens=8, bottleneck_dim=43),      # T = 8 at the defaults' budget
    "iapt_d_t16_m39": dict(num_soft_tokens=16, bottleneck_dim=39),    # T = 16 at the defaults' budget
    "iapt_d_bilevel": {},                                              # the paper's bi-level training
}
IAPT_ABLATIONS.update(DEFAULTS_ABLATIONS)


# What every run of the report trains with unless its method changes it: W_pool at the LR, as all
# runs before the pooling scale became a default (TrainConfig's default is now 3, measured here as
# iapt_pool_lr3), so that every stored run can be reproduced under its own name.
RUN_RECIPE = {"pool_lr_scale": 1.0}
# The method whose runs are the library defaults (IAPTConfig(), TrainConfig()'s lr and pooling scale).
DEFAULTS_METHOD = "iapt_pool_lr3"

# Ablations of the training recipe rather than the adapter: TrainConfig fields changed.
TRAIN_OVERRIDES = {
    "iapt_bilevel": dict(bilevel=True),   # rationals on a held-out 10 % of the train split, lr 1e-6
    "iapt_anchor_lr": dict(anchor_lr=3e-2),
    "iapt_cosine": dict(lr_schedule="cosine"),
    "iapt_pool_lr": dict(pool_lr_scale=10.0),  # under Adam: scores × 10 (temperature 0.1), same start
    "iapt_pool_lr3": dict(pool_lr_scale=3.0),
}
# The ablations of the defaults train as the defaults do, plus their own change.
TRAIN_OVERRIDES.update({name: dict(TRAIN_OVERRIDES[DEFAULTS_METHOD]) for name in DEFAULTS_ABLATIONS})
TRAIN_OVERRIDES["iapt_d_bilevel"].update(TRAIN_OVERRIDES["iapt_bilevel"])
DEFAULT_LR.update({name: DEFAULT_LR["iapt"] for name in IAPT_ABLATIONS})
DEFAULT_LR["iapt_lr3e-3"] = 3e-3
DEFAULT_LR.update({name: DEFAULT_LR["iapt_lr3e-3"] for name in DEFAULTS_ABLATIONS})
MAIN_METHODS = ("zero_shot", "prompt_tuning", "prefix_tuning", "lora", "iapt_paper", "iapt")


METHODS = (*MAIN_METHODS, *IAPT_ABLATIONS)


METHOD_LABELS = {
    "zero_shot": "zero-shot",
    "prompt_tuning": "prompt tuning (PEFT, TEXT init)",
    "prefix_tuning": "prefix tuning (PEFT, no projection)",
    "lora": "LoRA q,v (PEFT; rank matched to IAPT)",
    "iapt_paper": "IAPT, paper form (IAPTConfig.paper())",
    "iapt": "IAPT (IAPTConfig(), W_pool at the LR), LR as the sweep chose",
    "iapt_text_init": "ablation: IAPT, anchor from the init text",
    "iapt_unscaled": "ablation: IAPT, s = 1",
    "iapt_hidden_pool": "ablation: IAPT, pool_input hidden",
    "iapt_up_0.1": "ablation: IAPT, init_std_up 0.1",
    "iapt_anchors_only": "ablation: IAPT anchors only (no generator term)",
    "iapt_t8": "ablation: IAPT, T = 8",
    "iapt_t16": "ablation: IAPT, T = 16",
    "iapt_t16_m39": "ablation: IAPT, T = 16, m = 39 (the defaults' parameter budget)",
    "iapt_top_half": "ablation: IAPT, upper half of the layers only",
    "iapt_lr3e-3": "IAPT, lr 3e-3, W_pool at the LR (the former defaults)",
    "iapt_bilevel": "ablation: IAPT, bi-level training (the paper's)",
    "iapt_anchor_lr": "ablation: IAPT, anchors at lr 3e-2",
    "iapt_cosine": "ablation: IAPT, cosine LR decay",
    "iapt_pool_lr": "ablation: IAPT, W_pool at 10× the LR (pooling temperature 0.1)",
    "iapt_pool_lr3": "IAPT defaults (IAPTConfig(), lr 3e-3, W_pool at 3× the LR: pooling temperature 1/3)",
    "iapt_dot_anchor": "defaults ablation: anchors from T × \".\" instead of T × BOS",
    "iapt_d_text_init": "defaults ablation: anchors from the task's init text",
    "iapt_d_t8_m43": "defaults ablation: T = 8, m = 43 (the defaults' parameter budget)",
    "iapt_d_t16_m39": "defaults ablation: T = 16, m = 39 (the defaults' parameter budget)",
    "iapt_d_bilevel": "defaults ablation: bi-level training (the paper's)",
}


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def iapt_config(name: str, args: argparse.Namespace, task: Task | None = None, num_layers: int | None = None):
    """The IAPTConfig of an IAPT method: the library defaults, the paper's exact form, or an ablation."""
    from iapt_fast import IAPTConfig

    if name == "iapt_paper":
        return IAPTConfig.paper(num_soft_tokens=args.num_soft_tokens, bottleneck_dim=args.bottleneck_dim)
    overrides = dict(IAPT_ABLATIONS.get(name, {}))
    if overrides.get("anchor_init") == "text" and "prompt_init_text" not in overrides:
        overrides["prompt_init_text"] = task.init_text
    if overrides.get("target_layers") == "top_half":
        overrides["target_layers"] = list(range(num_layers // 2, num_layers))
    return IAPTConfig(**{"num_soft_tokens": args.num_soft_tokens, "bottleneck_dim": args.bottleneck_dim, **overrides})


def iapt_param_count(base, args: argparse.Namespace) -> int:
    """Trainable parameters of IAPT with the library defaults on ``base`` (the budget LoRA matches)."""
    return iapt_config("iapt", args).num_parameters(base.config.hidden_size, base.config.num_hidden_layers)


def lora_rank_for(base, target_params: int, targets: list[str]) -> int:
    """LoRA rank whose parameter count on ``targets`` comes closest to ``target_params``."""
    per_rank = 0
    for name, mod in base.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            per_rank += mod.in_features + mod.out_features
    return max(1, round(target_params / per_rank))


def build_method(name: str, load_base: Callable, args: argparse.Namespace, tokenizer, task: Task, seed: int):
    base = load_base()
    for p in base.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    if name == "zero_shot":
        return base
    if name == "prompt_tuning":
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        text = args.tokenizer_path is not None
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_soft_tokens,
                                 prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
                                 prompt_tuning_init_text=task.init_text if text else None,
                                 tokenizer_name_or_path=args.tokenizer_path)
        return get_peft_model(base, cfg)
    if name == "prefix_tuning":
        from peft import PrefixTuningConfig, get_peft_model

        return get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_soft_tokens))
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        rank = lora_rank_for(base, iapt_param_count(base, args), args.lora_targets)
        cfg = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                         target_modules=args.lora_targets)
        return get_peft_model(base, cfg)
    if name.startswith("iapt"):
        from iapt_fast import get_iapt_model

        return get_iapt_model(base, iapt_config(name, args, task, base.config.num_hidden_layers), seed=seed,
                              tokenizer=tokenizer)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")

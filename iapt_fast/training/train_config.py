"""TrainConfig: the hyper-parameters of one training run (validated; the CLI's training options).

Each field's ``metadata`` holds its command-line help (and, where needed, ``aliases``,
``choices``, ``required``): ``transformers.HfArgumentParser`` turns the fields into options.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig", "DEFAULT_POOL_LR_SCALE"]

# W_pool's LR multiplier when pool_lr_scale is left unset and the model has trainable pooling weights.
DEFAULT_POOL_LR_SCALE = 3.0


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    Steps are optimizer steps; each consumes ``batch_size × grad_accum`` training examples
    (and, in bi-level mode, as many dev examples for the rational step).
    """

    # The command line's group of these options (HfArgumentParser reads this class attribute).
    _argument_group_name = "training (TrainConfig)"

    output_dir: str = field(default="iapt-output", metadata={
        "help": "where the adapter, checkpoints and metrics go", "required": True})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (default: from --epochs)"})
    num_epochs: float = field(default=1.0, metadata={
        "help": "passes over the train data when --max-steps is unset", "aliases": ["--epochs"]})
    batch_size: int = field(default=8, metadata={
        "help": "examples per micro-batch (the global one under DDP/FSDP)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    eval_batch_size: int = field(default=32, metadata={"help": "examples per evaluation forward"})
    # 3e-3: the LR with the best mean dev score over the quality report's tuned tasks for IAPT (and for LoRA),
    # measured in benchmarks/results/quality-2026-12-07.
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the generator weights"})
    rational_lr: float | None = field(default=None, metadata={
        "help": "learning rate of the rational coefficients (default: 1e-6 with --bilevel, else --lr)"})
    anchor_lr: float | None = field(default=None, metadata={
        "help": "learning rate of the anchors B_l of the anchored form (default: --lr). They live at the residual "
                "stream's scale, where Adam's lr-sized steps barely move them at the generator's LR"})
    # 3 by default: the best recipe over the six tasks of benchmarks/results/quality-2026-12-07 (it gains
    # where an answer hinges on a few instruction tokens; no task loses beyond its interval).
    pool_lr_scale: float | None = field(default=None, metadata={
        "help": "the pooling weights W_pool train at lr × this. Under Adam that is the pooling scores scaled by "
                "it (a temperature of 1/scale) with the same start: above 1 the pooling can sharpen away from "
                f"uniform. Default: {DEFAULT_POOL_LR_SCALE:g} where the model has trainable pooling weights "
                "(1 trains them at --lr)"})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW weight decay (never on rational coefficients)"})
    adam_betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas, b1,b2"})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "linear warm-up steps (default: --warmup-ratio)"})
    warmup_ratio: float = field(default=0.1, metadata={
        "help": "warm-up share of the steps, then --lr-schedule"})
    lr_schedule: str = field(default="linear", metadata={
        "help": "after the warm-up: linear decay to 0, cosine decay to 0, or constant",
        "choices": ("linear", "cosine", "constant")})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient clipping (0 disables)"})
    precision: str = field(default="fp32", metadata={
        "help": "backbone dtype; trainable generator weights always stay float32", "choices": ("fp32", "bf16")})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "non-reentrant activation checkpointing"})
    bilevel: bool = field(default=False, metadata={
        "help": "the paper's bi-level mode: rational coefficients on the dev split (own LR), other generator "
                "weights on train, alternating steps; default is joint training"})
    eval_every: int | None = field(default=None, metadata={"help": "evaluate every N steps (and at the end)"})
    save_every: int | None = field(default=None, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "checkpoints of this run kept"})
    log_every: int = field(default=1, metadata={"help": "record the training loss every N steps"})
    trim_logits: bool = field(default=True, metadata={
        "help": "compute the LM head only where labels are (same loss, less work; --no-trim-logits: at every "
                "position)"})
    seed: int = field(default=0, metadata={"help": "seeds initialisation, data order and splits"})
    progress: bool = field(default=True, metadata={"help": "a progress bar (--no-progress: none)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start a new run in an --output-dir that holds another run's output (its checkpoints are then "
                "never resumed or pruned); without it such a folder is refused"})

    def __post_init__(self) -> None:
        for name in ("num_epochs", "lr", "rational_lr", "anchor_lr", "pool_lr_scale", "weight_decay", "warmup_ratio", "max_grad_norm"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if (not isinstance(self.adam_betas, (tuple, list)) or len(self.adam_betas) != 2
                or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.adam_betas)):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        positive_ints = ("batch_size", "grad_accum", "eval_batch_size", "log_every")
        for name in positive_ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("max_steps", "eval_every", "save_every", "save_total_limit", "warmup_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "warmup_steps" else 1)):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if not self.num_epochs > 0:
            raise ValueError(f"num_epochs must be > 0, got {self.num_epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.rational_lr is not None and not self.rational_lr >= 0:
            raise ValueError(f"rational_lr must be >= 0, got {self.rational_lr!r}")
        if self.anchor_lr is not None and not self.anchor_lr >= 0:
            raise ValueError(f"anchor_lr must be >= 0, got {self.anchor_lr!r}")
        if self.pool_lr_scale is not None and not self.pool_lr_scale > 0:
            raise ValueError(f"pool_lr_scale must be > 0, got {self.pool_lr_scale!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if self.lr_schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'linear', 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))

    @property
    def resolved_rational_lr(self) -> float:
        if self.rational_lr is not None:
            return self.rational_lr
        return 1e-6 if self.bilevel else self.lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

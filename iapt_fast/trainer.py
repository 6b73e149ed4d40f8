"""The IAPT training loop: joint or bi-level, with exact checkpoint/resume.

Precision: ``precision="bf16"`` means the frozen backbone runs in bfloat16 while the trainable
parameters stay float32 (AdamW master weights). bfloat16 master weights would silently
freeze the rational coefficients: a 1e-6 step on a coefficient of size ~1 is far below
bfloat16's resolution (2⁻⁸ relative). The generators accumulate in float32 and hand
bfloat16 soft tokens to the backbone (design.md §3). No autocast is used, so the trainer gives
the same numbers on CPU and GPU for the same dtypes.

Loss: summed over the response tokens of all micro-batches of one optimizer step, divided by
their total count — gradient accumulation gives exactly the gradient of the full batch.

Resume: a checkpoint holds the adapter (``save_pretrained``, loadable on its own) and
``trainer_state.pt`` (trainable parameters, optimizers, schedulers, step, data-stream
positions and every RNG), so k steps + resume + (N − k) steps equals N steps bit for bit.

The loop works for any model whose trainable parameters are the ones to train and whose
forward returns ``.logits`` (IAPTModel, PEFT models), which is how the quality report trains
every method with the same code.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .atomic import atomic_directory, atomic_write_text
from .bilevel import grad_only_for, split_parameters
from .checkpoints import (RUN_NAME, STATE_NAME, TrainingInterrupted, check_output_dir, check_resume_config, find_resumable,
                          latest_checkpoint, read_state, run_id_of, start_run)
from .data import IAPTCollator
from .evaluation import accepts_instruction_mask, evaluate_loss, model_inputs, response_loss_sum

__all__ = ["TrainConfig", "BatchStream", "Trainer", "TrainingInterrupted", "latest_checkpoint", "STATE_NAME"]

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    Steps are optimizer steps; each consumes ``batch_size × grad_accum`` training examples
    (and, in bi-level mode, as many dev examples for the rational step).
    """

    output_dir: str = "iapt-output"
    max_steps: int | None = None          # None: derived from num_epochs
    num_epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    eval_batch_size: int = 32
    lr: float = 1e-3
    rational_lr: float | None = None      # None: 1e-6 in bi-level mode (the paper), lr in joint mode
    weight_decay: float = 0.0             # never applied to rational coefficients
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = None       # None: warmup_ratio × max_steps
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"               # "fp32" | "bf16"
    gradient_checkpointing: bool = False
    bilevel: bool = False
    eval_every: int | None = None
    save_every: int | None = None
    save_total_limit: int | None = 2
    log_every: int = 1
    trim_logits: bool = True              # compute LM-head logits only where labels are (same loss, less work)
    seed: int = 0
    progress: bool = True
    overwrite_output_dir: bool = False    # a fresh run may start in a folder holding another run's output

    def __post_init__(self) -> None:
        for name in ("num_epochs", "lr", "rational_lr", "weight_decay", "warmup_ratio", "max_grad_norm"):
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
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
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


class BatchStream:
    """An endless, resumable stream of collated batches over a list of examples.

    Each epoch is a fresh permutation drawn from (seed, epoch) alone, so the stream's whole
    state is two integers and a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, examples: Sequence[Any], batch_size: int, collator: Callable, seed: int, shuffle: bool = True) -> None:
        if len(examples) == 0:
            raise ValueError("cannot stream an empty dataset")
        self.examples, self.batch_size, self.collator = examples, batch_size, collator
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=gen).tolist()

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.pos >= len(self.examples):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.pos:self.pos + self.batch_size]
        self.pos += len(idx)
        return self.collator([self.examples[i] for i in idx])

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.pos / len(self.examples)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": len(self.examples)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state["n"] != len(self.examples) or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint was written for {state['n']} examples with seed {state['seed']}, "
                f"this run has {len(self.examples)} with seed {self.seed}: resume needs the same data and seed"
            )
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation(self.epoch)


def _linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


class Trainer:
    """Trains the trainable parameters of ``model`` on tokenized instruction → response data.

    Args:
        model: IAPTModel (or any module whose forward returns ``.logits`` and whose only
            trainable parameters are the ones to train).
        config: TrainConfig.
        train_examples: tokenized examples (``iapt_fast.data.tokenize_records``) with labels.
        collator: pads examples into batches (right padding is the usual choice).
        eval_examples: optional; evaluated every ``eval_every`` steps and at the end.
        dev_examples: the held-out split of the rational coefficients; required with
            ``config.bilevel``.
        eval_fn: optional extra metric, ``eval_fn(model) -> dict`` (e.g. choice accuracy),
            run with every evaluation.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_examples: Sequence[Any], collator: IAPTCollator,
                 eval_examples: Sequence[Any] | None = None, dev_examples: Sequence[Any] | None = None,
                 eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None) -> None:
        self.model, self.config, self.collator = model, config, collator
        self.train_examples, self.eval_examples, self.dev_examples = train_examples, eval_examples, dev_examples
        self.eval_fn = eval_fn
        self.device = next(model.parameters()).device
        self.with_instruction_mask = accepts_instruction_mask(model)
        if not train_examples:
            raise ValueError("train_examples is empty")

        weights, rationals = split_parameters(model)
        if not weights and not rationals:
            raise ValueError("the model has no trainable parameters")
        for name, p in weights + rationals:
            if p.dtype != torch.float32:
                raise TypeError(
                    f"trainable parameter {name} is {p.dtype}; keep trainable parameters float32 "
                    "(precision='bf16' casts only the frozen backbone)"
                )
        self.weight_params = [p for _, p in weights]
        self.rational_params = [p for _, p in rationals]
        self.param_names = [n for n, _ in weights + rationals]

        if config.bilevel:
            if not rationals:
                raise ValueError("bilevel=True needs rational parameters (names containing rat_num/rat_den); none are trainable")
            if not weights:
                raise ValueError("bilevel=True needs trainable non-rational parameters; none found")
            if not dev_examples:
                raise ValueError("bilevel=True needs dev_examples (the held-out split for the rational coefficients)")

        steps_per_epoch = math.ceil(len(train_examples) / (config.batch_size * config.grad_accum))
        self.max_steps = config.max_steps or max(1, math.ceil(steps_per_epoch * config.num_epochs))
        warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * self.max_steps)
        self.warmup_steps = min(warmup, self.max_steps)

        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        betas = config.adam_betas
        if config.bilevel:
            self.optimizers["weights"] = torch.optim.AdamW(self.weight_params, lr=config.lr, betas=betas,
                                                          weight_decay=config.weight_decay)
            self.optimizers["rationals"] = torch.optim.AdamW(self.rational_params, lr=config.resolved_rational_lr,
                                                            betas=betas, weight_decay=0.0)
        else:
            groups = []
            if self.weight_params:
                groups.append({"params": self.weight_params, "lr": config.lr, "weight_decay": config.weight_decay})
            if self.rational_params:
                groups.append({"params": self.rational_params, "lr": config.resolved_rational_lr, "weight_decay": 0.0})
            self.optimizers["joint"] = torch.optim.AdamW(groups, betas=betas)
        factor = _linear_schedule(self.warmup_steps, self.max_steps)
        self.schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, factor) for k, o in self.optimizers.items()}

        self.train_stream = BatchStream(train_examples, config.batch_size, collator, config.seed)
        self.dev_stream = (BatchStream(dev_examples, config.batch_size, collator, config.seed + 1)
                           if config.bilevel else None)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.run_id: str | None = None  # set when training starts (fresh) or resumes
        self.own_checkpoints: list[str] = []  # folders this run wrote, oldest first: the only ones it prunes
        self._stop_signal: int | None = None
        self._gc_enabled = False
        self._trim_logits = config.trim_logits

    # ------------------------------------------------------------------ one optimizer step
    def _accumulate(self, stream: BatchStream) -> tuple[float, int, int]:
        """Forward/backward ``grad_accum`` micro-batches; loss normalised over all their labels."""
        batches = [stream.next_batch() for _ in range(self.config.grad_accum)]
        total = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in batches)
        if total == 0:
            raise ValueError("a training step has no labelled (response) tokens; check the data and max_length")
        loss_sum, tokens = 0.0, 0
        for batch in batches:
            inputs = model_inputs(batch, self.with_instruction_mask, self.device)
            labels = batch["labels"].to(self.device)
            keep = self._logits_to_keep(labels)
            if keep is not None:
                inputs["logits_to_keep"] = keep
                labels = labels[:, -keep:]
            try:
                out = self.model(**inputs)
            except TypeError as err:
                if keep is None or "logits_to_keep" not in str(err):
                    raise
                self._trim_logits = False  # this model's forward does not take it: full logits
                inputs.pop("logits_to_keep")
                labels = batch["labels"].to(self.device)
                out = self.model(**inputs)
            loss, _ = response_loss_sum(out.logits, labels)
            (loss / total).backward()
            loss_sum += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        mean = loss_sum / total
        if not math.isfinite(mean):
            raise FloatingPointError(f"non-finite training loss {mean} at step {self.step}")
        return mean, tokens, total

    def _logits_to_keep(self, labels: torch.Tensor) -> int | None:
        """How many trailing positions need logits: from the one before the first label on.

        The LM head over the whole vocabulary is a large share of a small model's step
        (SmolLM2-135M: 49k × 576, ~20 % of the forward); classification-style data needs
        it at one or two positions only.
        """
        if not self._trim_logits:
            return None
        labelled = labels.ne(-100).any(0).nonzero()
        if len(labelled) == 0:
            return None
        keep = labels.shape[1] - int(labelled[0]) + 1
        return keep if keep < labels.shape[1] else None

    def _apply(self, name: str, params: list[nn.Parameter]) -> float | None:
        norm = None
        if self.config.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        self.optimizers[name].step()
        self.schedulers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)
        return norm

    def dev_step(self) -> tuple[float, int]:
        """Bi-level: one AdamW step of the rational coefficients on the dev split (weights untouched)."""
        if not self.config.bilevel:
            raise RuntimeError("dev_step is only defined in bi-level mode")
        self.model.train()
        with grad_only_for(self.rational_params, self.weight_params):
            loss, tokens, _ = self._accumulate(self.dev_stream)
            self._apply("rationals", self.rational_params)
        return loss, tokens

    def weight_step(self) -> tuple[float, int, float | None]:
        """One AdamW step on the train split: the weights (bi-level) or everything (joint)."""
        self.model.train()
        if self.config.bilevel:
            with grad_only_for(self.weight_params, self.rational_params):
                loss, tokens, _ = self._accumulate(self.train_stream)
                norm = self._apply("weights", self.weight_params)
        else:
            loss, tokens, _ = self._accumulate(self.train_stream)
            norm = self._apply("joint", self.weight_params + self.rational_params)
        return loss, tokens, norm

    def train_step(self) -> dict[str, float]:
        """One step: joint, or bi-level (DARTS order: rationals on dev first, then weights on train)."""
        record: dict[str, float] = {}
        tokens = 0
        if self.config.bilevel:
            record["dev_loss"], tokens = self.dev_step()
        loss, n, norm = self.weight_step()
        self.step += 1
        record.update(loss=loss, tokens=tokens + n,
                      lr=self.schedulers["weights" if self.config.bilevel else "joint"].get_last_lr()[0])
        if norm is not None:
            record["grad_norm"] = norm
        return record

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Eval loss (token-weighted) and whatever ``eval_fn`` reports."""
        out: dict[str, float] = {}
        if self.eval_examples:
            out["eval_loss"] = evaluate_loss(self.model, self.eval_examples, self.collator,
                                             self.config.eval_batch_size, self.device)
        if self.eval_fn is not None:
            out.update({f"eval_{k}" if not k.startswith("eval_") else k: float(v) for k, v in self.eval_fn(self.model).items()})
        return out

    # ------------------------------------------------------------------ checkpoints
    def _rng_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
        try:
            import numpy as np
            state["numpy"] = np.random.get_state()
        except ImportError:  # pragma: no cover
            pass
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _set_rng_state(self, state: Mapping[str, Any]) -> None:
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        if "numpy" in state:
            import numpy as np
            np.random.set_state(state["numpy"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def _checkpoint_state(self, path: str, params: dict[str, torch.Tensor], optimizers: dict[str, Any],
                          rng: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """Everything a resume needs; ``params`` / ``optimizers`` as whole (gathered) tensors."""
        return {
            "step": self.step,
            "max_steps": self.max_steps,
            "warmup_steps_resolved": self.warmup_steps,
            "bilevel": self.config.bilevel,
            "params": params,
            "optimizers": optimizers,
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "train_stream": self.train_stream.state_dict(),
            "dev_stream": self.dev_stream.state_dict() if self.dev_stream else None,
            "rng": rng,
            "history": self.history,
            "config": self.config.to_dict(),
            "run_id": self.run_id,
            "checkpoints": self._own_after(path),
            **extra,
        }

    def _checkpoint_path(self, path: str | None) -> str:
        return os.path.abspath(path or os.path.join(self.config.output_dir, f"checkpoint-{self.step}"))

    def _own_after(self, path: str) -> list[str]:
        """This run's checkpoint list once ``path`` is written (folders in output_dir only)."""
        if os.path.dirname(path) != os.path.abspath(self.config.output_dir):
            return list(self.own_checkpoints)
        name = os.path.basename(path)
        return [n for n in self.own_checkpoints if n != name] + [name]

    def _write_checkpoint(self, path: str, state: dict[str, Any], adapter: Any = None) -> None:
        """Adapter + trainer state into ``path`` by one rename, then prune this run's old ones."""
        with atomic_directory(path) as tmp:
            if adapter is not None:
                from .adapter_io import save_adapter
                save_adapter(adapter, tmp)
            elif hasattr(self.model, "save_pretrained"):
                self.model.save_pretrained(tmp)
            torch.save(state, os.path.join(tmp, STATE_NAME))
        self.own_checkpoints = state["checkpoints"]
        self._prune_checkpoints(keep=os.path.basename(path))

    def save_checkpoint(self, path: str | None = None) -> str:
        """Adapter (``save_pretrained``) + ``trainer_state.pt`` into ``checkpoint-<step>``, atomically."""
        path = self._checkpoint_path(path)
        named = dict(self.model.named_parameters())
        params = {n: named[n].detach().cpu().clone() for n in self.param_names}
        optimizers = {k: o.state_dict() for k, o in self.optimizers.items()}
        self._write_checkpoint(path, self._checkpoint_state(path, params, optimizers, self._rng_state()))
        return path

    def _prune_checkpoints(self, keep: str, delete: bool = True) -> None:
        """Delete this run's oldest checkpoints beyond ``save_total_limit`` (never another run's)."""
        limit = self.config.save_total_limit
        if limit is None or len(self.own_checkpoints) <= limit:
            return
        drop = [n for n in self.own_checkpoints[:-limit] if n != keep]
        for name in drop if delete else ():
            shutil.rmtree(os.path.join(self.config.output_dir, name), ignore_errors=True)
        self.own_checkpoints = [n for n in self.own_checkpoints if n not in drop]

    def _check_state(self, path: str, state: Mapping[str, Any]) -> None:
        """Refuse a checkpoint this run cannot continue exactly, naming what differs."""
        check_resume_config(path, state, self.config.to_dict(), self.max_steps, self.warmup_steps)
        named = dict(self.model.named_parameters())
        missing = [n for n in self.param_names if n not in state["params"]]
        if missing:
            raise ValueError(f"checkpoint {path!r} lacks trainable parameters {missing[:3]} (was it written for "
                             "another model or adapter?)")
        for n in self.param_names:
            want, got = tuple(named[n].shape), tuple(state["params"][n].shape)  # a DTensor's shape is the whole one
            if want != got:
                raise ValueError(f"checkpoint {path!r}: {n} has shape {got}, this model's is {want}: the adapter was "
                                 "built with another num_soft_tokens / bottleneck_dim / rational degrees; resume "
                                 "with the checkpoint's adapter settings")
        saved = os.path.join(path, "adapter_config.json")
        peft_config = getattr(self.model, "peft_config", None)
        active = getattr(self.model, "active_adapter", None)
        if os.path.isfile(saved) and isinstance(peft_config, Mapping) and active in peft_config:
            from .config import IAPTConfig
            theirs = IAPTConfig.from_pretrained(path).to_dict()
            ours = peft_config[active].to_dict()
            diffs = [f"{k}: checkpoint {theirs[k]!r}, this run {ours.get(k)!r}" for k in theirs
                     if k != "base_model_name_or_path" and theirs[k] != ours.get(k)]
            if diffs:
                raise ValueError(f"checkpoint {path!r} was trained with another adapter config: " + "; ".join(diffs))

    def load_checkpoint(self, path: str, state: Mapping[str, Any] | None = None) -> None:
        """Restore everything ``save_checkpoint`` wrote; the next step continues exactly.

        Raises ValueError naming the file for a corrupt or truncated state, and naming every
        difference for a checkpoint of another configuration; nothing is changed then.
        """
        state = read_state(path) if state is None else state
        self._check_state(path, state)
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n in self.param_names:
                named[n].copy_(state["params"][n])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self._restore_common(state, state["rng"])

    def _restore_common(self, state: Mapping[str, Any], rng: Mapping[str, Any]) -> None:
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.train_stream.load_state_dict(state["train_stream"])
        if self.dev_stream is not None:
            self.dev_stream.load_state_dict(state["dev_stream"])
        self._set_rng_state(rng)
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.run_id = state.get("run_id")
        self.own_checkpoints = list(state.get("checkpoints", []))

    def _start_fresh(self) -> None:
        """Claim the output folder for a new run (refusing another run's output) and seed."""
        cfg = self.config
        check_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.run_id = start_run(cfg.output_dir)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

    def _resolve_resume(self, resume_from: str | None) -> tuple[str | None, Mapping[str, Any] | None]:
        if resume_from != "auto":
            return resume_from, None
        found = find_resumable(self.config.output_dir)
        return found if found is not None else (None, None)

    def _adopt_output_dir(self) -> None:
        """A run resumed into a folder without a marker claims it under its own id."""
        if self.run_id is not None and run_id_of(self.config.output_dir) is None:
            os.makedirs(self.config.output_dir, exist_ok=True)
            atomic_write_text(os.path.join(self.config.output_dir, RUN_NAME), json.dumps({"run_id": self.run_id}) + "\n")

    # ------------------------------------------------------------------ preemption
    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM / SIGINT: finish the step, checkpoint, stop (a second signal acts as usual)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def handler(signum, frame):
            self._stop_signal = signum
            for sig, old in previous.items():  # the next signal is not caught again
                signal.signal(sig, old)

        for sig in _STOP_SIGNALS:
            previous[sig] = signal.signal(sig, handler)
        return previous

    def _stop_requested(self) -> int | None:
        """The signal that asked this run to stop, if any."""
        return self._stop_signal

    # ------------------------------------------------------------------ the loop
    def _enable_gradient_checkpointing(self) -> None:
        if self._gc_enabled or not self.config.gradient_checkpointing:
            return
        target = getattr(self.model, "base_model", self.model)
        if not hasattr(target, "gradient_checkpointing_enable"):
            raise ValueError(f"{type(target).__name__} does not support gradient checkpointing")
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._gc_enabled = True

    def train(self, resume_from: str | None = None, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train to ``max_steps`` (or until ``stop_after`` steps in all) and return the history.

        ``resume_from``: a checkpoint folder, or "auto" for the latest one in output_dir (a
        fresh start when there is none). Seeds are set from ``config.seed`` on a fresh start.
        """
        cfg = self.config
        resume_from, state = self._resolve_resume(resume_from)
        if resume_from:
            self.load_checkpoint(resume_from, state)
            self._adopt_output_dir()
        elif self.step == 0:
            self._start_fresh()
        self._enable_gradient_checkpointing()
        end = self.max_steps if stop_after is None else min(self.max_steps, stop_after)
        bar = None
        if cfg.progress and self.step < end:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.max_steps, initial=self.step, desc="train" + (" (bi-level)" if cfg.bilevel else ""),
                       dynamic_ncols=True)
        ema = None
        self._stop_signal = None
        previous = self._install_signal_handlers()
        try:
            while self.step < end:
                t0 = time.perf_counter()
                rec = self.train_step()
                dt = time.perf_counter() - t0
                rec.update(step=self.step, time=dt, tokens_per_s=rec["tokens"] / max(dt, 1e-9),
                           epoch=self.train_stream.epochs_done)
                ema = rec["loss"] if ema is None else 0.9 * ema + 0.1 * rec["loss"]
                if self.step % cfg.log_every == 0 or self.step == end:
                    self.history.append(rec)
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == self.max_steps):
                    ev = self.evaluate()
                    if ev:
                        self.history.append({"step": self.step, **ev})
                        if bar is not None:
                            bar.write(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()))
                if bar is not None:
                    bar.set_postfix(loss=f"{ema:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", lr=f"{rec['lr']:.2e}")
                    bar.update(1)
                stop = self._stop_requested()
                if stop:
                    raise TrainingInterrupted(stop, self.save_checkpoint(), self.step)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.max_steps:
                    self.save_checkpoint()
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
            if bar is not None:
                bar.close()
        return self.history

    def save_history(self, path: str | None = None) -> str:
        path = path or os.path.join(self.config.output_dir, "history.jsonl")
        atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in self.history))
        return path


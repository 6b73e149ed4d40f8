"""The IAPT training loop: joint or bi-level, with exact checkpoint/resume.

Precision: ``precision="bf16"`` means the frozen backbone runs in bfloat16 while the trainable
parameters stay float32 (AdamW master weights). bfloat16 master weights would silently
freeze the rational coefficients: a 1e-6 step on a coefficient of size ~1 is far below
bfloat16's resolution (2⁻⁸ relative). The generators accumulate in float32 and hand
bfloat16 soft tokens to the backbone (DESIGN §3). No autocast is used, so the trainer gives
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
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .bilevel import grad_only_for, split_parameters
from .data import IAPTCollator
from .evaluation import accepts_instruction_mask, evaluate_loss, model_inputs, response_loss_sum

__all__ = ["TrainConfig", "BatchStream", "Trainer", "latest_checkpoint", "STATE_NAME"]

STATE_NAME = "trainer_state.pt"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


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

    def __post_init__(self) -> None:
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


def latest_checkpoint(output_dir: str) -> str | None:
    """Path of the highest-step ``checkpoint-N`` folder holding a trainer state, or None."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT_RE.match(name)
        if m and os.path.isfile(os.path.join(output_dir, name, STATE_NAME)):
            found.append((int(m.group(1)), name))
    return os.path.join(output_dir, max(found)[1]) if found else None


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

    def save_checkpoint(self, path: str | None = None) -> str:
        """Adapter (``save_pretrained``) + ``trainer_state.pt`` into ``checkpoint-<step>``."""
        path = path or os.path.join(self.config.output_dir, f"checkpoint-{self.step}")
        os.makedirs(path, exist_ok=True)
        if hasattr(self.model, "save_pretrained"):
            self.model.save_pretrained(path)
        named = dict(self.model.named_parameters())
        state = {
            "step": self.step,
            "max_steps": self.max_steps,
            "bilevel": self.config.bilevel,
            "params": {n: named[n].detach().cpu().clone() for n in self.param_names},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "train_stream": self.train_stream.state_dict(),
            "dev_stream": self.dev_stream.state_dict() if self.dev_stream else None,
            "rng": self._rng_state(),
            "history": self.history,
            "config": self.config.to_dict(),
        }
        tmp = os.path.join(path, STATE_NAME + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(path, STATE_NAME))  # a crash mid-save never leaves a torn state
        self._prune_checkpoints(keep=path)
        return path

    def _prune_checkpoints(self, keep: str) -> None:
        limit = self.config.save_total_limit
        if limit is None or not os.path.isdir(self.config.output_dir):
            return
        ckpts = sorted((int(m.group(1)), name) for name in os.listdir(self.config.output_dir)
                       if (m := _CKPT_RE.match(name)))
        for _, name in ckpts[:-limit]:
            full = os.path.join(self.config.output_dir, name)
            if os.path.abspath(full) != os.path.abspath(keep):
                shutil.rmtree(full, ignore_errors=True)

    def load_checkpoint(self, path: str) -> None:
        """Restore everything ``save_checkpoint`` wrote; the next step continues exactly."""
        file = os.path.join(path, STATE_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {STATE_NAME} in {path!r}")
        # weights_only=False: the state holds Python RNG tuples; it is our own file.
        state = torch.load(file, map_location="cpu", weights_only=False)
        if state["bilevel"] != self.config.bilevel:
            raise ValueError(f"checkpoint {path!r} was trained with bilevel={state['bilevel']}, this run has bilevel={self.config.bilevel}")
        if state["max_steps"] != self.max_steps:
            raise ValueError(f"checkpoint {path!r} has max_steps={state['max_steps']}, this run {self.max_steps}: "
                             "the learning-rate schedule would differ")
        named = dict(self.model.named_parameters())
        missing = [n for n in self.param_names if n not in state["params"]]
        if missing:
            raise ValueError(f"checkpoint {path!r} lacks trainable parameters {missing[:3]}...")
        with torch.no_grad():
            for n in self.param_names:
                named[n].copy_(state["params"][n])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.train_stream.load_state_dict(state["train_stream"])
        if self.dev_stream is not None:
            self.dev_stream.load_state_dict(state["dev_stream"])
        self._set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state["history"])

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
        if resume_from == "auto":
            resume_from = latest_checkpoint(cfg.output_dir)
        if resume_from:
            self.load_checkpoint(resume_from)
        elif self.step == 0:
            random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
        self._enable_gradient_checkpointing()
        end = self.max_steps if stop_after is None else min(self.max_steps, stop_after)
        bar = None
        if cfg.progress and self.step < end:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.max_steps, initial=self.step, desc="train" + (" (bi-level)" if cfg.bilevel else ""),
                       dynamic_ncols=True)
        ema = None
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
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.max_steps:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        return self.history

    def save_history(self, path: str | None = None) -> str:
        path = path or os.path.join(self.config.output_dir, "history.jsonl")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            for rec in self.history:
                fh.write(json.dumps(rec) + "\n")
        return path

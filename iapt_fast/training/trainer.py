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

import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from iapt_fast.atomic import atomic_write_text
from iapt_fast.training.bilevel import grad_only_for, is_anchor_parameter, is_pool_parameter, split_parameters
from iapt_fast.training.accumulation import GradientAccumulator
from iapt_fast.training.batches import BatchStream
from iapt_fast.training.checkpoints import STATE_NAME, TrainingInterrupted, latest_checkpoint
from iapt_fast.training.data import IAPTCollator
from iapt_fast.training.dist_context import SINGLE_PROCESS, DistContext
from iapt_fast.training.evaluation import accepts_instruction_mask
from iapt_fast.training.fingerprint import examples_digest
from iapt_fast.training.parallel import ddp_wrap, full_tensor, is_dtensor, save_adapter
from iapt_fast.training.preemption import StopSignals
from iapt_fast.training.sharded import ShardedBatchStream, sharded_eval_loss
from iapt_fast.training.train_config import DEFAULT_POOL_LR_SCALE, TrainConfig
from iapt_fast.training.trainer_checkpoints import (RunSetup, RunState, Trainables, adopt_output_dir, load_checkpoint,
                                                    resolve_resume, save_checkpoint, start_fresh)

__all__ = ["TrainConfig", "BatchStream", "Trainer", "TrainingInterrupted", "latest_checkpoint", "STATE_NAME"]


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning rate's multiplier at each step: linear warm-up over ``warmup`` steps, then
    ``schedule``: "linear" decay to 0 at ``total``, "cosine" decay to 0, or "constant"."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)
    return factor


class Trainer:
    """Trains the trainable parameters of ``model`` on tokenized instruction → response data,
    in one process or over the ranks of a DDP / FSDP2 job.

    Args:
        model: IAPTModel (or any module whose forward returns ``.logits`` and whose only
            trainable parameters are the ones to train). Under DDP / FSDP it must have gone
            through :func:`iapt_fast.training.parallel.prepare_model` with the same ``ctx``.
        config: TrainConfig. ``batch_size`` is the global micro-batch: a multiple of the world
            size, split over the ranks.
        train_examples: tokenized examples (``iapt_fast.training.data.tokenize_records``) with labels.
        collator: pads examples into batches (right padding is the usual choice).
        eval_examples: optional; evaluated every ``eval_every`` steps and at the end.
        dev_examples: the held-out split of the rational coefficients; required with
            ``config.bilevel``.
        eval_fn: optional extra metric, ``eval_fn(model) -> dict`` (e.g. choice accuracy),
            run with every evaluation (on every rank: see ``sharded_choice_eval_fn``).
        ctx: the job (default: one process). With several ranks every method that touches
            the model (train, evaluate, save_checkpoint, load_checkpoint) is collective.
        data_fingerprint: what produced the examples (e.g. the data files' digest, templates,
            max length, tokenizer digest; JSON-like values), recorded in every checkpoint with
            digests of the examples themselves: a resume whose fingerprint differs is refused,
            naming each difference (:mod:`iapt_fast.training.fingerprint`).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_examples: Sequence[Any], collator: IAPTCollator,
                 eval_examples: Sequence[Any] | None = None, dev_examples: Sequence[Any] | None = None,
                 eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
                 ctx: DistContext | None = None, data_fingerprint: Mapping[str, Any] | None = None) -> None:
        self.ctx = SINGLE_PROCESS if ctx is None else ctx
        if not isinstance(self.ctx, DistContext):
            raise TypeError(f"ctx must be a DistContext, got {type(self.ctx).__name__}")
        self.model, self.config, self.collator = model, config, collator
        self.train_examples, self.eval_examples, self.dev_examples = train_examples, eval_examples, dev_examples
        self.eval_fn = eval_fn
        self.data_fingerprint = dict(data_fingerprint or {})
        self._fingerprint: dict[str, Any] | None = None
        self.device = next(model.parameters()).device
        self.with_instruction_mask = accepts_instruction_mask(model)
        if not train_examples:
            raise ValueError("train_examples is empty")
        self._check_job()
        self._split_parameters()
        steps_per_epoch = math.ceil(len(train_examples) / (config.batch_size * config.grad_accum))
        self.max_steps = config.max_steps or max(1, math.ceil(steps_per_epoch * config.num_epochs))
        warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * self.max_steps)
        self.warmup_steps = min(warmup, self.max_steps)
        self._build_optimizers()
        self.train_stream = self._stream(train_examples, config.seed)
        self.dev_stream = self._stream(dev_examples, config.seed + 1) if config.bilevel else None
        # One progress bar per job, not per rank.
        self.progress = config.progress and self.ctx.is_main
        self._forward_module: nn.Module = model
        if self.ctx.strategy == "ddp":
            # Bi-level steps leave one side's parameters out of the graph: DDP must look for them.
            self._forward_module = ddp_wrap(model, self.ctx, find_unused_parameters=config.bilevel)
        # The run's own bookkeeping; checkpoints take it and hand back the updated one.
        self.run = RunState()
        self.trainables = Trainables(model, self.param_names, self.optimizers, self.schedulers, self.train_stream,
                                     self.dev_stream)
        self.accumulator = GradientAccumulator(
            model, self._forward_module, self.ctx, grad_accum=config.grad_accum,
            with_instruction_mask=self.with_instruction_mask, device=self.device, trim_logits=config.trim_logits,
            params=self.weight_params + self.rational_params)
        self._gc_enabled = False
        self._ema: float | None = None  # the progress bar's smoothed loss

    def _check_job(self) -> None:
        ctx, batch = self.ctx, self.config.batch_size
        if batch % ctx.world_size:
            raise ValueError(
                f"batch_size {batch} (the global micro-batch) is not divisible by the world size "
                f"{ctx.world_size}; use a multiple of {ctx.world_size} (e.g. "
                f"{max(ctx.world_size, batch // ctx.world_size * ctx.world_size)})")
        sharded = any(is_dtensor(p) for p in self.model.parameters())
        if ctx.strategy == "fsdp" and not sharded:
            raise ValueError("distributed='fsdp' but the model is not sharded: call prepare_model(model, ctx) first")
        if ctx.strategy != "fsdp" and sharded:
            raise ValueError(f"the model is FSDP-sharded but ctx.strategy is {ctx.strategy!r}")

    def _split_parameters(self) -> None:
        weights, rationals = split_parameters(self.model)
        if not weights and not rationals:
            raise ValueError("the model has no trainable parameters")
        for name, p in weights + rationals:
            if p.dtype != torch.float32:
                raise TypeError(f"trainable parameter {name} is {p.dtype}; keep trainable parameters float32 "
                                "(precision='bf16' casts only the frozen backbone)")
        self.weight_params = [p for _, p in weights]
        self.rational_params = [p for _, p in rationals]
        self.param_names = [n for n, _ in weights + rationals]
        if self.config.bilevel:
            if not rationals:
                raise ValueError("bilevel=True needs rational parameters (names containing rat_num/rat_den); "
                                 "none are trainable")
            if not weights:
                raise ValueError("bilevel=True needs trainable non-rational parameters; none found")
            if not self.dev_examples:
                raise ValueError("bilevel=True needs dev_examples (the held-out split for the rational coefficients)")

    def _weight_groups(self) -> list[dict[str, Any]]:
        """AdamW groups of the non-rational weights: the anchors (``anchor_lr``) and W_pool
        (lr × ``pool_lr_scale``) get their own group only when it differs, so the optimizer state of a
        run without them keeps its layout."""
        config = self.config
        names = dict(zip(map(id, self.weight_params), self.param_names))
        pool_scale = config.pool_lr_scale
        if pool_scale is None:  # the default: applies where there are pooling weights (none: anchors only, LoRA)
            has_pool = any(is_pool_parameter(names[id(p)]) for p in self.weight_params)
            pool_scale = DEFAULT_POOL_LR_SCALE if has_pool else 1.0
        own = [(name, lr, test) for name, lr, test in (("anchor_lr", config.anchor_lr, is_anchor_parameter),
                                                      ("pool_lr_scale", config.lr * pool_scale
                                                       if pool_scale != 1 else None, is_pool_parameter))
               if lr is not None]
        groups, rest = [], list(self.weight_params)
        for name, lr, test in own:
            mine = [p for p in rest if test(names[id(p)])]
            if not mine:
                raise ValueError(f"{name} is set but the model has no trainable parameters it applies to "
                                 f"({'anchors: the anchored generator form' if name == 'anchor_lr' else 'w_pool'})")
            rest = [p for p in rest if not test(names[id(p)])]
            groups.append({"params": mine, "lr": lr, "weight_decay": config.weight_decay})
        main = [{"params": rest, "lr": config.lr, "weight_decay": config.weight_decay}] if rest else []
        return main + groups

    def _build_optimizers(self) -> None:
        config, betas = self.config, self.config.adam_betas
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        if config.bilevel:
            self.optimizers["weights"] = torch.optim.AdamW(self._weight_groups(), betas=betas)
            self.optimizers["rationals"] = torch.optim.AdamW(self.rational_params, lr=config.resolved_rational_lr,
                                                            betas=betas, weight_decay=0.0)
        else:
            groups = []
            if self.weight_params:
                groups += self._weight_groups()
            if self.rational_params:
                groups.append({"params": self.rational_params, "lr": config.resolved_rational_lr, "weight_decay": 0.0})
            self.optimizers["joint"] = torch.optim.AdamW(groups, betas=betas)
        factor = lr_factor(self.config.lr_schedule, self.warmup_steps, self.max_steps)
        self.schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, factor) for k, o in self.optimizers.items()}

    def _stream(self, examples: Sequence[Any], seed: int) -> BatchStream:
        if not self.ctx.enabled:
            return BatchStream(examples, self.config.batch_size, self.collator, seed)
        return ShardedBatchStream(examples, self.config.batch_size, self.collator, seed, self.ctx.rank,
                                  self.ctx.world_size)

    # ------------------------------------------------------------------ the run's state
    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self.run.step

    @property
    def history(self) -> list[dict[str, Any]]:
        """The logged records (losses, evaluations), oldest first."""
        return self.run.history

    @property
    def run_id(self) -> str | None:
        """The id of the run this trainer continues (its output folder's owner)."""
        return self.run.run_id

    # ------------------------------------------------------------------ one optimizer step
    def _optimizer_step(self, name: str, params: list[nn.Parameter]) -> float | None:
        """Clip, step, schedule and zero one optimizer; returns the gradient norm before clipping."""
        norm = None
        if self.config.max_grad_norm is not None:
            # Under FSDP the norm is a replicated DTensor (the shards' norms are reduced).
            norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)))
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
            loss, tokens, _ = self.accumulator.run(self.dev_stream, self.step)
            self._optimizer_step("rationals", self.rational_params)
        return loss, tokens

    def weight_step(self) -> tuple[float, int, float | None]:
        """One AdamW step on the train split: the weights (bi-level) or everything (joint)."""
        self.model.train()
        if self.config.bilevel:
            with grad_only_for(self.weight_params, self.rational_params):
                loss, tokens, _ = self.accumulator.run(self.train_stream, self.step)
                norm = self._optimizer_step("weights", self.weight_params)
        else:
            loss, tokens, _ = self.accumulator.run(self.train_stream, self.step)
            norm = self._optimizer_step("joint", self.weight_params + self.rational_params)
        return loss, tokens, norm

    def train_step(self) -> dict[str, float]:
        """One step: joint, or bi-level (DARTS order: rationals on dev first, then weights on train)."""
        record: dict[str, float] = {}
        tokens = 0
        if self.config.bilevel:
            record["dev_loss"], tokens = self.dev_step()
        loss, n, norm = self.weight_step()
        self.run.step += 1
        record.update(loss=loss, tokens=tokens + n,
                      lr=self.schedulers["weights" if self.config.bilevel else "joint"].get_last_lr()[0])
        if norm is not None:
            record["grad_norm"] = norm
        return record

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Eval loss (token-weighted, over every rank's share) and whatever ``eval_fn`` reports."""
        out: dict[str, float] = {}
        if self.eval_examples:
            per_rank = max(1, self.config.eval_batch_size // self.ctx.world_size)
            out["eval_loss"] = sharded_eval_loss(self.model, self.eval_examples, self.collator, per_rank,
                                                 self.with_instruction_mask, self.device, self.ctx)
        if self.eval_fn is not None:
            out.update({f"eval_{k}" if not k.startswith("eval_") else k: float(v)
                        for k, v in self.eval_fn(self.model).items()})
        return out

    # ------------------------------------------------------------------ checkpoints
    @property
    def fingerprint(self) -> dict[str, Any]:
        """Everything that decides this run's batches (``data_fingerprint`` + digests of the
        examples and the collator); a resume must match it. Computed once, on first use."""
        if self._fingerprint is None:
            c = self.collator
            collator = {k: getattr(c, k) for k in ("pad_token_id", "padding_side", "pad_to_multiple_of") if hasattr(c, k)}
            self._fingerprint = {
                **self.data_fingerprint,
                "train examples (tokenized)": examples_digest(self.train_examples),
                **({"dev examples (tokenized)": examples_digest(self.dev_examples)} if self.config.bilevel else {}),
                "collator": {"class": type(c).__name__, **collator},
            }
        return self._fingerprint

    def run_setup(self) -> RunSetup:
        """What decides this run's trajectory: a resumed checkpoint must match it."""
        return RunSetup(self.config, self.max_steps, self.warmup_steps, self.fingerprint)

    def save_checkpoint(self, path: str | None = None) -> str:
        """Adapter + trainer state into ``checkpoint-<step>`` (or ``path``), atomically, pruning this
        run's old checkpoints; collective. Returns the folder."""
        path, self.run = save_checkpoint(self.run, self.trainables, self.run_setup(), self.ctx, path)
        return path

    def load_checkpoint(self, path: str, state: Mapping[str, Any] | None = None) -> None:
        """Restore a checkpoint (written by any world size) so the next step continues exactly; collective."""
        self.run = load_checkpoint(path, self.trainables, self.run_setup(), self.ctx, state)

    def _stop_requested(self, signals: StopSignals) -> int | None:
        """The signal that asked this run to stop, if any; a signal on any rank stops every
        rank after the same step (one collective checkpoint)."""
        (signum,) = self.ctx.all_reduce_max([signals.signum or 0])
        return int(signum) or None

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

        ``resume_from``: a checkpoint folder, or "auto" for this run's latest one in output_dir
        (a fresh start when there is none). Seeds are set from ``config.seed`` on a fresh start.
        SIGTERM / SIGINT finish the current step, write a checkpoint and raise
        :class:`~iapt_fast.training.checkpoints.TrainingInterrupted`.
        """
        asked_auto = resume_from == "auto"
        resume_from, state = resolve_resume(resume_from, self.config.output_dir, self.ctx)
        if resume_from:
            self.load_checkpoint(resume_from, state)
            adopt_output_dir(self.config.output_dir, self.run_id, self.ctx)
        elif self.step == 0:
            self.run = start_fresh(self.config, self.ctx, resume_auto=asked_auto)
        self._enable_gradient_checkpointing()
        end = self.max_steps if stop_after is None else min(self.max_steps, stop_after)
        bar = None
        if self.progress and self.step < end:
            bar = tqdm(total=self.max_steps, initial=self.step, dynamic_ncols=True,
                       desc="train" + (" (bi-level)" if self.config.bilevel else ""))
        try:
            with StopSignals() as signals:
                while self.step < end:
                    self._loop_step(end, bar)
                    stop = self._stop_requested(signals)
                    if stop:
                        raise TrainingInterrupted(stop, self.save_checkpoint(), self.step)
                    if self.config.save_every and self.step % self.config.save_every == 0 \
                            and self.step < self.max_steps:
                        self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        return self.history

    def _loop_step(self, end: int, bar: Any) -> None:
        """One optimizer step with its logging and periodic evaluation."""
        cfg = self.config
        t0 = time.perf_counter()
        rec = self.train_step()
        dt = time.perf_counter() - t0
        rec.update(step=self.step, time=dt, tokens_per_s=rec["tokens"] / max(dt, 1e-9),
                   epoch=self.train_stream.epochs_done)
        self._ema = rec["loss"] if self._ema is None else 0.9 * self._ema + 0.1 * rec["loss"]
        if self.step % cfg.log_every == 0 or self.step == end:
            self.history.append(rec)
        if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == self.max_steps):
            ev = self.evaluate()
            if ev:
                self.history.append({"step": self.step, **ev})
                if bar is not None:
                    bar.write(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()))
        if bar is not None:
            bar.set_postfix(loss=f"{self._ema:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", lr=f"{rec['lr']:.2e}")
            bar.update(1)

    def save_history(self, path: str | None = None) -> str:
        """The history as JSON lines (rank 0 writes)."""
        path = path or os.path.join(self.config.output_dir, "history.jsonl")
        if self.ctx.is_main:
            atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in self.history))
        self.ctx.barrier()
        return path

    def save_adapter(self, directory: str | os.PathLike) -> None:
        """The trained adapter, gathered, written by rank 0 (see :func:`iapt_fast.training.parallel.save_adapter`)."""
        save_adapter(self.model, directory, self.ctx)



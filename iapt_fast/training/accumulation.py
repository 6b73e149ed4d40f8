"""The micro-batches of one optimizer step: forward, loss, backward, and the gradient sync.

The loss is summed over the response tokens of every micro-batch of the step (on every rank)
and divided by their total count, so gradient accumulation and sharding give exactly the
gradient of the whole batch.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Iterator

import torch
from torch import nn

from iapt_fast.training.batches import BatchStream
from iapt_fast.training.data import IGNORE_INDEX
from iapt_fast.training.dist_context import DistContext
from iapt_fast.training.evaluation import model_inputs, response_loss_sum

__all__ = ["GradientAccumulator", "accepts_logits_to_keep"]

# Where a wrapper's ``forward(**kwargs)`` sends its keywords: DDP's ``module``, PEFT's and
# IAPTModel's ``base_model``, a PEFT tuner's ``model``.
_INNER = ("module", "base_model", "model")


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (transformers' causal LMs do).

    A forward that only has ``**kwargs`` counts when the module it forwards them to (followed
    through DDP, PEFT and IAPTModel wrappers) names the argument; any other forward does not.
    """
    seen: set[int] = set()
    module: nn.Module | None = model
    while isinstance(module, nn.Module) and id(module) not in seen:
        seen.add(id(module))
        try:
            params = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            return False
        if "logits_to_keep" in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
        module = next((m for m in (module._modules.get(name) for name in _INNER) if m is not None), None)
    return False


class GradientAccumulator:
    """Runs the forward/backward of one step's micro-batches for a Trainer.

    Args:
        model: the model (owner of the parameters); forward_module: what the forward goes
            through (the model, or its DDP wrapper).
        params: the trainable parameters (gradients of the frozen side of a bi-level step are
            dropped).
        trim_logits: compute LM-head logits only from the first labelled position on, when
            the model's forward takes ``logits_to_keep`` (decided here, once; the attribute
            says whether it does).
    """

    def __init__(self, model: nn.Module, forward_module: nn.Module, ctx: DistContext, *, grad_accum: int,
                 with_instruction_mask: bool, device: torch.device, trim_logits: bool,
                 params: list[nn.Parameter]) -> None:
        self.model, self._forward_module, self.ctx = model, forward_module, ctx
        self.grad_accum, self.with_instruction_mask, self.device = grad_accum, with_instruction_mask, device
        self.trim_logits = trim_logits and accepts_logits_to_keep(model)
        self.params = params

    @contextlib.contextmanager
    def _sync_gradients(self, sync: bool) -> Iterator[None]:
        """Micro-batches of one accumulated step skip the gradient sync but the last."""
        if self.ctx.strategy == "ddp" and not sync:
            with self._forward_module.no_sync():
                yield
        elif self.ctx.strategy == "fsdp":
            self.model.set_requires_gradient_sync(sync)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            yield

    def run(self, stream: BatchStream, step: int) -> tuple[float, int, int]:
        """Forward/backward ``grad_accum`` micro-batches; loss normalised over all their labels
        (of every rank), so accumulation and sharding give exactly the full batch's gradient."""
        ctx = self.ctx
        batches = [stream.next_batch() for _ in range(self.grad_accum)]
        local = sum(int(b["labels"][:, 1:].ne(IGNORE_INDEX).sum()) for b in batches)
        total = int(ctx.all_reduce_sum([local])[0])
        if total == 0:
            raise ValueError("a training step has no labelled (response) tokens; check the data and max_length")
        # FSDP2 keeps computing gradients for the unsharded copies of parameters that bi-level
        # mode switched off; they are dropped below so the other side's step never sees them.
        inactive = [p for p in self.params if not p.requires_grad]
        loss_sum, tokens = 0.0, 0
        for i, batch in enumerate(batches):
            with self._sync_gradients(i == len(batches) - 1):
                out, labels = self._forward(batch)
                loss, count = response_loss_sum(out.logits, labels)
                if count == 0:
                    # A padding share: a zero that still reaches every parameter, so the
                    # gradient collectives of this rank match the others'.
                    loss = out.logits.sum() * 0.0
                # DDP and FSDP average gradients over the ranks; × world_size makes it the global sum.
                (loss * ctx.world_size / total).backward()
            loss_sum += float(loss.detach())
            if count:
                tokens += int(batch["attention_mask"].sum())
        for p in inactive:
            p.grad = None
        loss_sum, tokens = ctx.all_reduce_sum([loss_sum, tokens])
        mean = loss_sum / total
        if not math.isfinite(mean):
            raise FloatingPointError(f"non-finite training loss {mean} at step {step}")
        return mean, int(tokens), total

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """One micro-batch forward (through the DDP wrapper if any) → (output, aligned labels).

        Logits are computed only from the first labelled position on (``trim_logits``).
        """
        inputs = model_inputs(batch, self.with_instruction_mask, self.device)
        labels = batch["labels"].to(self.device)
        keep = self.logits_to_keep(labels)
        if keep is None:
            return self._forward_module(**inputs), labels
        return self._forward_module(**inputs, logits_to_keep=keep), labels[:, -keep:]

    def logits_to_keep(self, labels: torch.Tensor) -> int | None:
        """How many trailing positions need logits: from the one before the first label on.

        The LM head over the whole vocabulary is a large share of a small model's step
        (SmolLM2-135M: 49k × 576, ~20 % of the forward); classification-style data needs
        it at one or two positions only.
        """
        if not self.trim_logits:
            return None
        labelled = labels.ne(IGNORE_INDEX).any(0).nonzero()
        if len(labelled) == 0:
            return None
        keep = labels.shape[1] - int(labelled[0]) + 1
        return keep if keep < labels.shape[1] else None

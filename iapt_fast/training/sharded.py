"""Data over the ranks of a job: each rank's share of every batch, and evaluation sharded and
gathered (padded so every rank runs the same number of forwards: FSDP all-gathers each
layer in every forward)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from iapt_fast.training.data import IGNORE_INDEX, IAPTCollator
from iapt_fast.training.dist_context import DistContext
from iapt_fast.training.evaluation import response_loss_totals
from iapt_fast.training.batches import BatchStream

__all__ = ["shard_rows", "ShardedBatchStream", "padded_shard", "sharded_eval_loss", "sharded_choice_eval_fn"]


def shard_rows(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` rows; sizes differ by at most one (may be empty)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def _mask_labels(batch: dict[str, Tensor], rows: slice | None = None) -> dict[str, Tensor]:
    """Labels of padding rows set to IGNORE_INDEX: they run the forward, add nothing to the loss."""
    if "labels" in batch:
        batch["labels"] = batch["labels"].clone()
        batch["labels"][rows if rows is not None else slice(None)] = IGNORE_INDEX
    return batch


class ShardedBatchStream(BatchStream):
    """The single-process :class:`~iapt_fast.training.trainer.BatchStream`, each batch split over the ranks.

    All ranks draw the same global batch (same permutation, same position) and keep their
    contiguous share, so the state is the global stream's and resumes under any world size.
    A rank whose share of a short last batch is empty gets one row of the batch with its
    labels ignored: it still runs the forward/backward the collectives expect.
    """

    def __init__(self, examples: Sequence[Any], batch_size: int, collator: Callable, seed: int, rank: int,
                 world_size: int, shuffle: bool = True) -> None:
        super().__init__(examples, batch_size, collator, seed, shuffle)
        self.rank, self.world_size = rank, world_size

    def next_batch(self) -> dict[str, Tensor]:
        if self.pos >= len(self.examples):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.pos:self.pos + self.batch_size]
        self.pos += len(idx)
        mine = idx[shard_rows(len(idx), self.rank, self.world_size)]
        if not mine:
            return _mask_labels(self.collator([self.examples[idx[0]]]))
        return self.collator([self.examples[i] for i in mine])


def padded_shard(items: Sequence[Any], ctx: DistContext) -> tuple[list[Any], int]:
    """Rank's strided share of ``items``, padded to the same length on every rank.

    Returns (rows, real): rows[:real] are this rank's items, the rest repeat items[0].
    """
    if not ctx.enabled:
        return list(items), len(items)
    per_rank = -(-len(items) // ctx.world_size)
    mine = list(items[ctx.rank::ctx.world_size])
    return mine + [items[0]] * (per_rank - len(mine)), len(mine)


def sharded_eval_loss(model: nn.Module, examples: Sequence[Any], collator: IAPTCollator, batch_size: int,
                       with_mask: bool, device: torch.device, ctx: DistContext) -> float:
    """Token-weighted mean response loss over all ranks' shards (every rank gets the same value)."""
    rows, real = padded_shard(examples, ctx)
    total, count = response_loss_totals(model, rows, collator, batch_size, with_mask, device, real=real)
    total, count = ctx.all_reduce_sum([total, count])
    return total / max(count, 1)


def sharded_choice_eval_fn(tokenizer: Any, pairs: Sequence[tuple[str, str]], choices: Sequence[str],
                           batch_size: int, max_length: int | None, ctx: DistContext
                           ) -> Callable[[nn.Module], dict[str, float]] | None:
    """Choice accuracy (``{"accuracy": a}``) computed on every rank's share and gathered.

    Pairs whose response is not one of ``choices`` are skipped; None when none is left.
    Every rank must call the returned function (it runs collectives).
    """
    from iapt_fast.training.evaluation import choice_examples, score_choices

    prompts, gold = choice_examples(pairs, choices)
    if not prompts:
        return None
    mine_prompts, real = padded_shard(prompts, ctx)
    mine_gold, _ = padded_shard(gold, ctx)

    def fn(model: nn.Module) -> dict[str, float]:
        scores = score_choices(model, tokenizer, mine_prompts, list(choices), batch_size=batch_size,
                               max_length=max_length)
        right = (scores.argmax(1)[:real] == torch.tensor(mine_gold[:real], dtype=torch.long)).sum().item()
        right, total = ctx.all_reduce_sum([right, real])
        return {"accuracy": right / total}

    return fn

"""Distributed IAPT training on torch's own engines: DDP and FSDP2, under torchrun or accelerate.

Nothing here launches processes. ``torchrun`` and ``accelerate launch`` start one process per
device and describe the job in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); :func:`init_distributed` reads it and joins the process group, and the one
:class:`~iapt_fast.training.trainer.Trainer`, given the resulting ``ctx``, trains exactly as it does in
one process, only spread over the ranks:

* ``--batch-size`` stays the GLOBAL micro-batch: every rank takes its contiguous share of each
  batch the single-process stream would draw, and the loss is normalised by the label count
  of the whole global step (an all-reduce), so N processes follow the single-process
  trajectory up to float summation order, and checkpoints resume under any world size.
* DDP: ``DistributedDataParallel`` all-reduces the generator gradients, overlapped with the
  backward; micro-batches of one accumulated step skip the sync but the last.
* FSDP: FSDP2 ``fully_shard`` on every decoder layer (the frozen backbone is sharded and
  all-gathered layer by layer) and on the whole model, whose group holds the generators,
  embeddings and head; the generators' weights, gradients and AdamW moments are sharded too.
  Activation checkpointing (``--gradient-checkpointing``) composes with it.
* Only rank 0 writes: checkpoints are gathered, built in a temporary folder and renamed into
  place, so an interrupted save never leaves a torn checkpoint. Every collective (including
  the rendezvous) gives up after the configured timeout with an error, never a silent hang.
* Evaluation is sharded over the ranks and gathered (sums of losses and label counts,
  correct answers and totals), padded so every rank runs the same number of forwards (FSDP
  needs that: every forward all-gathers each layer).

This module is the front of the pieces, each in its own file: ``dist_context.py`` (the job and
its collectives), ``parallel.py`` (FSDP2 / DDP placement, whole tensors in and out of shards,
the gathered adapter save) and ``sharded.py`` (each rank's share of the data, sharded
evaluation).

Known limits: a checkpoint is written by rank 0 and read by every rank, so multi-node resume
needs ``--output-dir`` on a filesystem all nodes share.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from iapt_fast.training.data import IAPTCollator
from iapt_fast.training.dist_context import (DEFAULT_TIMEOUT_S, STRATEGIES, DistContext, init_distributed, resolve_strategy,
                           shutdown)
from iapt_fast.training.parallel import prepare_model, save_adapter
from iapt_fast.training.sharded import ShardedBatchStream, shard_rows, sharded_choice_eval_fn
from iapt_fast.training.trainer import TrainConfig, Trainer

__all__ = [
    "STRATEGIES",
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "resolve_strategy",
    "init_distributed",
    "shutdown",
    "prepare_model",
    "ShardedBatchStream",
    "make_trainer",
    "save_adapter",
    "shard_rows",
    "sharded_choice_eval_fn",
]


def make_trainer(model: nn.Module, config: TrainConfig, train_examples: Sequence[Any], collator: IAPTCollator,
                 ctx: DistContext | None = None, **kwargs: Any) -> Trainer:
    """``Trainer(..., ctx=ctx)``: the same trainer for one process and for every rank of a job."""
    return Trainer(model, config, train_examples, collator, ctx=ctx, **kwargs)

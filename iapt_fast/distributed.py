"""Distributed IAPT training on torch's own engines: DDP and FSDP2, under torchrun or accelerate.

Nothing here launches processes. ``torchrun`` and ``accelerate launch`` start one process per
device and describe the job in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); :func:`init_distributed` reads it and joins the process group, and
:class:`DistributedTrainer` trains exactly as :class:`~iapt_fast.trainer.Trainer` does, only
spread over the ranks:

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

Known limits: a checkpoint is written by rank 0 and read by every rank, so multi-node resume
needs ``--output-dir`` on a filesystem all nodes share.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .atomic import atomic_write_text
from .checkpoints import (STATE_NAME, OutputDirNotEmpty, check_output_dir, latest_checkpoint, read_state,
                          start_run)
from .compat import ddp_buffer_kwargs, distribute_tensor_from_local_copies
from .data import IGNORE_INDEX, IAPTCollator
from .evaluation import model_inputs, response_loss_sum, response_loss_totals
from .trainer import BatchStream, TrainConfig, Trainer

__all__ = [
    "STRATEGIES",
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "resolve_strategy",
    "init_distributed",
    "shutdown",
    "prepare_model",
    "ShardedBatchStream",
    "DistributedTrainer",
    "make_trainer",
    "save_adapter",
    "shard_rows",
    "sharded_choice_eval_fn",
    "add_distributed_arguments",
]

STRATEGIES = ("auto", "none", "ddp", "fsdp")
# torch's own default for NCCL is 10 min, accelerate's 30; a collective that waits this long
# means a peer died or hangs, so we fail rather than wait on.
DEFAULT_TIMEOUT_S = 1800.0
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_LAUNCH_HINT = ("start one process per device with `torchrun --nproc_per_node N -m iapt_fast.train ...` "
                "or `accelerate launch --num_processes N -m iapt_fast.train ...`")


# ---------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job.

    Attributes:
        strategy: "none" (one process), "ddp" or "fsdp".
        rank, world_size, local_rank: from the launcher (0, 1, 0 without one).
        device: this rank's device (``cuda:LOCAL_RANK`` when CUDA is present, else cpu).
        timeout_s: seconds any collective may wait before it fails.
        owns_group: whether :func:`init_distributed` created the process group (and
            :func:`shutdown` should destroy it).
    """

    strategy: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """True when processes cooperate through a process group."""
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0


def _launch_env(env: Mapping[str, str]) -> dict[str, Any] | None:
    """The launcher's variables, validated; None when this is not a multi-process launch.

    RANK/WORLD_SIZE say a launcher started us; MASTER_ADDR/PORT alone do not
    (``accelerate launch`` sets them for a single process too).
    """
    present = {k: env[k] for k in _LAUNCH_VARS if env.get(k) not in (None, "")}
    if "RANK" not in present and "WORLD_SIZE" not in present:
        return None
    missing = [k for k in _LAUNCH_VARS if k not in present]
    if missing:
        raise RuntimeError(
            f"incomplete distributed environment: {', '.join(missing)} not set (found {', '.join(present)}); "
            + _LAUNCH_HINT
        )
    out: dict[str, Any] = {"MASTER_ADDR": present["MASTER_ADDR"]}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        try:
            out[key] = int(present[key])
        except ValueError:
            raise RuntimeError(f"environment variable {key}={present[key]!r} is not an integer") from None
    if out["WORLD_SIZE"] < 1 or not 0 <= out["RANK"] < out["WORLD_SIZE"] or out["LOCAL_RANK"] < 0:
        raise RuntimeError(f"inconsistent launcher environment: RANK={out['RANK']}, WORLD_SIZE={out['WORLD_SIZE']}, "
                           f"LOCAL_RANK={out['LOCAL_RANK']}")
    return out


def resolve_strategy(requested: str = "auto", env: Mapping[str, str] | None = None) -> str:
    """The strategy to run: "none", "ddp" or "fsdp".

    "auto" picks "none" for a single process and, under a launcher with WORLD_SIZE > 1, "fsdp"
    when ``accelerate launch`` was configured for FSDP (ACCELERATE_USE_FSDP), else "ddp".
    Raises ValueError for an unknown name, RuntimeError when the request and the launch
    disagree (ddp/fsdp without a launcher; "none" under a multi-process launch, where every
    process would train the same thing and write the same files).
    """
    if requested not in STRATEGIES:
        raise ValueError(f"distributed strategy must be one of {STRATEGIES}, got {requested!r}")
    env = os.environ if env is None else env
    launch = _launch_env(env)
    world = launch["WORLD_SIZE"] if launch else 1
    if requested == "auto":
        if world == 1:
            return "none"
        return "fsdp" if str(env.get("ACCELERATE_USE_FSDP", "")).lower() in ("1", "true", "yes") else "ddp"
    if requested == "none" and world > 1:
        raise RuntimeError(f"distributed='none' but the launcher started {world} processes; "
                           "use 'auto', 'ddp' or 'fsdp' (or launch a single process)")
    if requested in ("ddp", "fsdp") and launch is None:
        raise RuntimeError(f"distributed={requested!r} needs a launcher: RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT "
                           f"are not set; {_LAUNCH_HINT}")
    return requested


def init_distributed(strategy: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
                     device: str | torch.device | None = None, env: Mapping[str, str] | None = None) -> DistContext:
    """Join the process group the launcher describes (or run alone) and pick this rank's device.

    Args:
        strategy: "auto" | "none" | "ddp" | "fsdp" (see :func:`resolve_strategy`).
        timeout_s: how long the rendezvous and every later collective may wait, in seconds.
        device: None (CUDA when available, else CPU), or a device type to force, e.g. "cpu"
            to run gloo on CPU on a GPU machine. Under a launcher each rank takes
            ``cuda:LOCAL_RANK``; a single process keeps the index it is given.
        env: the environment to read (default ``os.environ``).
    Returns:
        A DistContext. Call :func:`shutdown` with it when done.
    Raises:
        ValueError: bad strategy or timeout.
        RuntimeError: inconsistent launch, or the rendezvous did not complete within
            ``timeout_s`` (a peer never started, wrong MASTER_ADDR/PORT, firewall).
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0 \
            or not math.isfinite(timeout_s):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    env = os.environ if env is None else env
    resolved = resolve_strategy(strategy, env)
    try:
        wanted = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device: {err}") from None
    if wanted is not None and wanted.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a cpu or cuda device, got {device!r}")
    if wanted is not None and wanted.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    cuda = torch.cuda.is_available() if wanted is None else wanted.type == "cuda"
    if resolved == "none":
        single = wanted if wanted is not None else torch.device("cuda" if cuda else "cpu")
        return DistContext("none", device=single, timeout_s=float(timeout_s))
    import torch.distributed as dist

    launch = _launch_env(env)
    assert launch is not None  # resolve_strategy guarantees it
    rank, world, local = launch["RANK"], launch["WORLD_SIZE"], launch["LOCAL_RANK"]
    if cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                               "start at most one process per device")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise RuntimeError(f"a process group is already initialised with rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, the environment says rank {rank} of {world}")
        return DistContext(resolved, rank, world, local, device, float(timeout_s), owns_group=False)
    # NCCL for CUDA tensors, gloo for the CPU ones (object gathers, CPU-offloaded states).
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    # env:// rendezvous reads the process environment (and, under torchrun, joins the agent's
    # store through it), so a caller-supplied ``env`` is copied there.
    if env is not os.environ:
        for key in _LAUNCH_VARS:
            os.environ[key] = str(launch[key])
    try:
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=float(timeout_s)))
    except Exception as err:  # DistStoreError, RuntimeError, OSError depending on the failure
        raise RuntimeError(
            f"rank {rank} of {world} could not complete the rendezvous at {launch['MASTER_ADDR']}:{launch['MASTER_PORT']} "
            f"within {timeout_s:g} s ({type(err).__name__}: {err}). Are all {world} processes started, with the same "
            f"MASTER_ADDR/MASTER_PORT, and is the port reachable? " + _LAUNCH_HINT
        ) from err
    return DistContext(resolved, rank, world, local, device, float(timeout_s), owns_group=True)


def shutdown(ctx: DistContext | None) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if ctx is None or not ctx.owns_group:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist
        dist.barrier()


def _all_reduce_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Sum a few float64 scalars over the ranks (identity for one process)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    import torch.distributed as dist

    # The scalars travel on the rank's device: NCCL cannot reduce CPU tensors.
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def _all_reduce_max(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Maximum of a few scalars over the ranks (identity for one process)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def _broadcast_object(obj: Any, ctx: DistContext) -> Any:
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=ctx.device)
    return box[0]


# ---------------------------------------------------------------------------------------------
# Model wrapping
# ---------------------------------------------------------------------------------------------
def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return isinstance(t, DTensor)


def _full(t: Tensor) -> Tensor:
    """The whole tensor behind a (possibly FSDP-sharded) parameter or state; collective for DTensors."""
    return t.full_tensor() if _is_dtensor(t) else t


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The backbone's repeated blocks: FSDP's units of sharding.

    IAPTModel knows its layers (architectures.py); any other transformers model names their
    class in ``_no_split_modules``.
    """
    arch = getattr(model, "_arch", None)
    if arch is not None and getattr(arch, "layers", None) is not None:
        return list(arch.layers)
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def _broadcast_trainable(model: nn.Module, ctx: DistContext) -> None:
    """Rank 0's initial generator weights on every rank.

    The frozen backbone comes from the same file everywhere; freshly initialised generators
    would differ between ranks if a user seeded differently, and neither DDP (we skip its
    whole-model broadcast) nor FSDP (which shards what each rank holds) would notice.
    """
    import torch.distributed as dist

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def prepare_model(model: nn.Module, ctx: DistContext, reshard_after_forward: bool = True) -> nn.Module:
    """Place ``model`` for ``ctx`` before the optimizer is built; returns the same module.

    none/ddp: moves it to ``ctx.device`` and (ddp) gives every rank rank 0's trainable weights;
    the DDP wrapper itself is made by :class:`DistributedTrainer`. fsdp: also shards it in
    place with FSDP2 ``fully_shard`` — each decoder layer, then the root — so parameter names
    are unchanged and parameters become DTensors. Pass the model still on the CPU: each layer
    then reaches the GPU one at a time and only as its shard, so a backbone larger than one
    GPU fits. Call it once, before building an optimizer (FSDP replaces the parameter objects).
    """
    if not isinstance(ctx, DistContext):
        raise TypeError(f"ctx must be a DistContext, got {type(ctx).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters")
    if any(_is_dtensor(p) for p in model.parameters()):
        raise ValueError("model is already sharded (its parameters are DTensors); call prepare_model once")
    if ctx.strategy != "fsdp":
        model.to(ctx.device)
    if ctx.strategy == "none":
        return model
    _broadcast_trainable(model, ctx)  # CPU tensors travel on gloo (see init_distributed)
    if ctx.strategy == "ddp":
        return model
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as err:  # pragma: no cover - torch < 2.6
        raise RuntimeError(f"distributed='fsdp' needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6): {err}") from err
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    layers = _decoder_layers(model)
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # The root group: generators (used from hooks inside the root's forward), embeddings, head.
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    model.to(ctx.device)  # buffers (rotary tables) that no group moved; sharded parameters stay put
    return model


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
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
    """The single-process :class:`~iapt_fast.trainer.BatchStream`, each batch split over the ranks.

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


def _padded_shard(items: Sequence[Any], ctx: DistContext) -> tuple[list[Any], int]:
    """Rank's strided share of ``items``, padded to the same length on every rank.

    Returns (rows, real): rows[:real] are this rank's items, the rest repeat items[0].
    """
    if not ctx.enabled:
        return list(items), len(items)
    per_rank = -(-len(items) // ctx.world_size)
    mine = list(items[ctx.rank::ctx.world_size])
    return mine + [items[0]] * (per_rank - len(mine)), len(mine)


def _sharded_eval_loss(model: nn.Module, examples: Sequence[Any], collator: IAPTCollator, batch_size: int,
                       with_mask: bool, device: torch.device, ctx: DistContext) -> float:
    """Token-weighted mean response loss over all ranks' shards (every rank gets the same value)."""
    rows, real = _padded_shard(examples, ctx)
    total, count = response_loss_totals(model, rows, collator, batch_size, with_mask, device, real=real)
    total, count = _all_reduce_sum([total, count], ctx)
    return total / max(count, 1)


def sharded_choice_eval_fn(tokenizer: Any, pairs: Sequence[tuple[str, str]], choices: Sequence[str],
                           batch_size: int, max_length: int | None, ctx: DistContext
                           ) -> Callable[[nn.Module], dict[str, float]] | None:
    """Choice accuracy (``{"accuracy": a}``) computed on every rank's share and gathered.

    Pairs whose response is not one of ``choices`` are skipped; None when none is left.
    Every rank must call the returned function (it runs collectives).
    """
    from .evaluation import choice_examples, score_choices

    prompts, gold = choice_examples(pairs, choices)
    if not prompts:
        return None
    mine_prompts, real = _padded_shard(prompts, ctx)
    mine_gold, _ = _padded_shard(gold, ctx)

    def fn(model: nn.Module) -> dict[str, float]:
        scores = score_choices(model, tokenizer, mine_prompts, list(choices), batch_size=batch_size,
                               max_length=max_length)
        right = (scores.argmax(1)[:real] == torch.tensor(mine_gold[:real], dtype=torch.long)).sum().item()
        right, total = _all_reduce_sum([right, real], ctx)
        return {"accuracy": right / total}

    return fn


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------
def _gathered_adapter(model: nn.Module, adapter_name: str | None = None):
    """A CPU AdapterGenerators with the full weights of the (possibly sharded) adapter; collective."""
    from .generator import AdapterGenerators

    name = adapter_name if adapter_name is not None else model._require_active()
    adapter = model.generators[name]
    weights = {layer: {w: _full(getattr(adapter[layer], w).detach()).cpu() for w in adapter[layer].names}
               for layer in adapter.layer_indices}
    return AdapterGenerators.from_weights(adapter.config, adapter.hidden_size, model._arch.num_layers, weights)


def save_adapter(model: nn.Module, directory: str | os.PathLike, ctx: DistContext | None = None,
                 adapter_name: str | None = None) -> None:
    """``model.save_pretrained(directory)`` for any strategy: gathered, rank 0 writes, atomically.

    Every rank must call it (FSDP gathers the shards). Each file lands by rename, so a reader
    never sees a half-written adapter. The result loads on one process with
    ``IAPTModel.from_pretrained(base, directory)``.
    """
    from .adapter_io import save_adapter as _save

    ctx = ctx or DistContext("none")
    sharded = any(_is_dtensor(p) for p in model.parameters())
    adapter = _gathered_adapter(model, adapter_name) if sharded else None
    if ctx.is_main:
        if adapter is not None:
            _save(adapter, directory)
        else:
            model.save_pretrained(directory, adapter_name=adapter_name)
    _barrier(ctx)


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
class DistributedTrainer(Trainer):
    """:class:`~iapt_fast.trainer.Trainer` over the ranks of ``ctx`` (DDP or FSDP).

    Same arguments as Trainer plus ``ctx``. ``model`` must have gone through
    :func:`prepare_model` with the same ``ctx``. ``config.batch_size`` is the global
    micro-batch and must be a multiple of the world size. Every method that touches the model
    (train, evaluate, save_checkpoint, load_checkpoint) is collective: call it on every rank.
    ``eval_fn`` runs on every rank too; :func:`sharded_choice_eval_fn` splits its work.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_examples: Sequence[Any], collator: IAPTCollator,
                 ctx: DistContext, eval_examples: Sequence[Any] | None = None,
                 dev_examples: Sequence[Any] | None = None,
                 eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None) -> None:
        if not isinstance(ctx, DistContext):
            raise TypeError(f"ctx must be a DistContext, got {type(ctx).__name__}")
        if config.batch_size % ctx.world_size:
            raise ValueError(
                f"batch_size {config.batch_size} (the global micro-batch) is not divisible by the world size "
                f"{ctx.world_size}; use a multiple of {ctx.world_size} (e.g. "
                f"{max(ctx.world_size, config.batch_size // ctx.world_size * ctx.world_size)})"
            )
        self.ctx = ctx
        self._sharded = any(_is_dtensor(p) for p in model.parameters())
        if ctx.strategy == "fsdp" and not self._sharded:
            raise ValueError("distributed='fsdp' but the model is not sharded: call prepare_model(model, ctx) first")
        if ctx.strategy != "fsdp" and self._sharded:
            raise ValueError(f"the model is FSDP-sharded but ctx.strategy is {ctx.strategy!r}")
        if not ctx.is_main:
            # One progress bar per job, not per rank. The caller's config object itself is
            # changed: callers adjust it after construction (e.g. eval_every) and every rank
            # must see the same schedule.
            config.progress = False
        super().__init__(model, config, train_examples, collator, eval_examples=eval_examples,
                         dev_examples=dev_examples, eval_fn=eval_fn)
        self.train_stream = ShardedBatchStream(train_examples, config.batch_size, collator, config.seed,
                                               ctx.rank, ctx.world_size)
        if self.dev_stream is not None:
            self.dev_stream = ShardedBatchStream(dev_examples, config.batch_size, collator, config.seed + 1,
                                                 ctx.rank, ctx.world_size)
        self._forward_module: nn.Module = model
        if ctx.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # Bi-level steps leave one side's parameters out of the graph: DDP must look for them.
            # prepare_model already broadcast the trainable weights; the backbone is read from
            # the same file everywhere, so DDP's whole-model broadcast is skipped.
            # Buffers (rotary tables) are the same on every rank: no per-forward buffer sync.
            self._forward_module = DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                find_unused_parameters=config.bilevel, init_sync=False, **ddp_buffer_kwargs(),
            )

    # ------------------------------------------------------------------ one optimizer step
    @contextlib.contextmanager
    def _sync_gradients(self, sync: bool) -> Iterator[None]:
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

    def _accumulate(self, stream: BatchStream) -> tuple[float, int, int]:
        """Like Trainer._accumulate, with the loss normalised by the GLOBAL label count."""
        ctx = self.ctx
        batches = [stream.next_batch() for _ in range(self.config.grad_accum)]
        local = sum(int(b["labels"][:, 1:].ne(IGNORE_INDEX).sum()) for b in batches)
        (total,) = _all_reduce_sum([local], ctx)
        total = int(total)
        if total == 0:
            raise ValueError("a training step has no labelled (response) tokens; check the data and max_length")
        # DDP and FSDP average gradients over the ranks; × world_size makes it the global sum.
        scale = ctx.world_size / total
        # FSDP2 keeps computing gradients for the unsharded copies of parameters that bi-level
        # mode switched off; they are dropped below so the other side's step never sees them.
        inactive = [p for p in self.weight_params + self.rational_params if not p.requires_grad]
        loss_sum, tokens = 0.0, 0
        for i, batch in enumerate(batches):
            with self._sync_gradients(i == len(batches) - 1):
                out, labels = self._forward(batch)
                loss, count = response_loss_sum(out.logits, labels)
                if count == 0:
                    # A padding share: a zero that still reaches every parameter, so the
                    # gradient collectives of this rank match the others'.
                    loss = out.logits.sum() * 0.0
                (loss * scale).backward()
            loss_sum += float(loss.detach())
            if count:
                tokens += int(batch["attention_mask"].sum())
        for p in inactive:
            p.grad = None
        loss_sum, tokens = _all_reduce_sum([loss_sum, tokens], ctx)
        mean = loss_sum / total
        if not math.isfinite(mean):
            raise FloatingPointError(f"non-finite training loss {mean} at step {self.step}")
        return mean, int(tokens), total

    def _forward(self, batch: dict[str, Tensor]) -> tuple[Any, Tensor]:
        """One micro-batch forward (through the DDP wrapper if any) → (output, aligned labels).

        Logits are computed only from the first labelled position on when the Trainer does
        that (``trim_logits``); a forward that rejects ``logits_to_keep`` falls back to full
        logits, as in Trainer.
        """
        inputs = model_inputs(batch, self.with_instruction_mask, self.device)
        labels = batch["labels"].to(self.device)
        trim = getattr(self, "_logits_to_keep", None)
        keep = trim(labels) if trim is not None else None
        if keep is None:
            return self._forward_module(**inputs), labels
        try:
            return self._forward_module(**inputs, logits_to_keep=keep), labels[:, -keep:]
        except TypeError as err:
            if "logits_to_keep" not in str(err):
                raise
            self._trim_logits = False
            return self._forward_module(**inputs), labels

    def _apply(self, name: str, params: list[nn.Parameter]) -> float | None:
        norm = None
        if self.config.max_grad_norm is not None:
            # With FSDP the norm is a replicated DTensor (the shards' norms are reduced).
            norm = float(_full(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)))
        self.optimizers[name].step()
        self.schedulers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)
        return norm

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Eval loss over all ranks' shards, and ``eval_fn`` (run on every rank)."""
        out: dict[str, float] = {}
        if self.eval_examples:
            per_rank = max(1, self.config.eval_batch_size // self.ctx.world_size)
            out["eval_loss"] = _sharded_eval_loss(self.model, self.eval_examples, self.collator, per_rank,
                                                  self.with_instruction_mask, self.device, self.ctx)
        if self.eval_fn is not None:
            out.update({f"eval_{k}" if not k.startswith("eval_") else k: float(v)
                        for k, v in self.eval_fn(self.model).items()})
        return out

    # ------------------------------------------------------------------ checkpoints
    def _full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` with every sharded state gathered (collective under FSDP)."""
        sd = optimizer.state_dict()
        if not self._sharded:
            return sd
        state = {idx: {k: (_full(v).cpu() if isinstance(v, Tensor) else v) for k, v in s.items()}
                 for idx, s in sd["state"].items()}
        return {"state": state, "param_groups": sd["param_groups"]}

    def save_checkpoint(self, path: str | None = None) -> str:
        """Gather, then rank 0 writes ``checkpoint-<step>`` atomically; the single-process format.

        Also stores every rank's RNG state, so a resume on the same world size continues
        each rank's random stream (dropout) exactly.
        """
        import torch.distributed as dist

        path = self._checkpoint_path(path)
        named = dict(self.model.named_parameters())
        params = {n: _full(named[n].detach()).cpu().clone() for n in self.param_names}
        optimizers = {k: self._full_optimizer_state(o) for k, o in self.optimizers.items()}
        adapter = _gathered_adapter(self.model) if self._sharded and hasattr(self.model, "generators") else None
        rngs: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(rngs, self._rng_state())
        state = self._checkpoint_state(path, params, optimizers, rngs[0], rng_per_rank=rngs,
                                       world_size=self.ctx.world_size)
        if self.ctx.is_main:
            self._write_checkpoint(path, state, adapter)
        else:
            self.own_checkpoints = state["checkpoints"]
            self._prune_checkpoints(keep=os.path.basename(path), delete=False)  # rank 0 deletes
        _barrier(self.ctx)
        return path

    def load_checkpoint(self, path: str, state: Mapping[str, Any] | None = None) -> None:
        """Restore a checkpoint written by any world size (or by the single-process Trainer)."""
        file = os.path.join(path, STATE_NAME)
        # Counted over all ranks, so every rank raises together instead of one raising alone
        # and leaving the others waiting in a collective.
        (blind,) = _all_reduce_sum([0 if os.path.isfile(file) else 1], self.ctx)
        if blind:
            raise FileNotFoundError(
                f"{int(blind)} of {self.ctx.world_size} rank(s) find no {STATE_NAME} in {path!r}"
                + ("" if blind == self.ctx.world_size else
                   " (rank 0 writes checkpoints: multi-node resume needs --output-dir on a shared filesystem)")
            )
        error = None
        try:
            state = read_state(path) if state is None else state
            self._check_state(path, state)
        except ValueError as err:
            error = str(err)
        errors: list[Any] = [None] * self.ctx.world_size
        import torch.distributed as dist
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise ValueError(first)
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n in self.param_names:
                _copy_into(named[n], state["params"][n])
        for k, o in self.optimizers.items():
            _load_optimizer(o, state["optimizers"][k])
        rngs = state.get("rng_per_rank")
        same_world = rngs is not None and state.get("world_size") == self.ctx.world_size
        self._restore_common(state, rngs[self.ctx.rank] if same_world else state["rng"])

    def _resolve_resume(self, resume_from: str | None) -> tuple[str | None, Mapping[str, Any] | None]:
        """``"auto"`` is resolved by rank 0 for all ranks; each rank then reads the state itself."""
        if resume_from != "auto":
            return resume_from, None
        return _broadcast_object(latest_checkpoint(self.config.output_dir) if self.ctx.is_main else None,
                                 self.ctx), None

    def _start_fresh(self) -> None:
        cfg = self.config
        errors: list[Any] = [None] * self.ctx.world_size
        try:
            check_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
            error = None
        except ValueError as err:
            error = str(err)
        import torch.distributed as dist
        dist.all_gather_object(errors, error)  # before rank 0 writes its marker
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise OutputDirNotEmpty(first)
        run_id = None
        if self.ctx.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            run_id = start_run(cfg.output_dir)
        self.run_id = _broadcast_object(run_id, self.ctx)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

    def _adopt_output_dir(self) -> None:
        if self.ctx.is_main:
            super()._adopt_output_dir()
        _barrier(self.ctx)

    def _stop_requested(self) -> int | None:
        """A signal on any rank stops every rank after the same step (one collective checkpoint)."""
        (signum,) = _all_reduce_max([self._stop_signal or 0], self.ctx)
        return int(signum) or None

    def save_history(self, path: str | None = None) -> str:
        path = path or os.path.join(self.config.output_dir, "history.jsonl")
        if self.ctx.is_main:
            atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in self.history))
        _barrier(self.ctx)
        return path

    def save_adapter(self, directory: str | os.PathLike) -> None:
        """The trained adapter, gathered, written by rank 0 (see :func:`save_adapter`)."""
        save_adapter(self.model, directory, self.ctx)


def _shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (the same on every rank) laid out as the DTensor ``like``; every rank must call it."""
    return distribute_tensor_from_local_copies(full.to(like.device), like.device_mesh, like.placements)


def _copy_into(param: Tensor, full: Tensor) -> None:
    """Copy a whole tensor into a parameter, or into this rank's shard of a DTensor one."""
    if _is_dtensor(param):
        param.to_local().copy_(_shard_like(full.to(param.dtype), param).to_local())
    else:
        param.copy_(full)


def _load_optimizer(optimizer: torch.optim.Optimizer, sd: Mapping[str, Any]) -> None:
    """Load a whole-tensor optimizer state, sharding it like the parameters it belongs to."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(_is_dtensor(p) for p in params):
        optimizer.load_state_dict(sd)
        return
    state = {}
    for idx, s in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {k: (_shard_like(v, p) if isinstance(v, Tensor) and _is_dtensor(p) and v.shape == p.shape else v)
                      for k, v in s.items()}
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


# ---------------------------------------------------------------------------------------------
# Glue for scripts and the CLI
# ---------------------------------------------------------------------------------------------
def make_trainer(model: nn.Module, config: TrainConfig, train_examples: Sequence[Any], collator: IAPTCollator,
                 ctx: DistContext | None = None, **kwargs: Any) -> Trainer:
    """A Trainer for one process, a DistributedTrainer otherwise (same keyword arguments)."""
    if ctx is None or not ctx.enabled:
        return Trainer(model, config, train_examples, collator, **kwargs)
    return DistributedTrainer(model, config, train_examples, collator, ctx, **kwargs)


def add_distributed_arguments(parser: Any) -> None:
    """The CLI's ``--distributed`` and ``--dist-timeout`` options."""
    g = parser.add_argument_group("distributed (launch with torchrun or accelerate launch)")
    g.add_argument("--distributed", choices=STRATEGIES, default="auto",
                   help="auto: DDP when launched with several processes (FSDP under an accelerate FSDP config), "
                        "else one process; fsdp: FSDP2, frozen backbone and generators sharded. "
                        "--batch-size is the global batch, split over the processes")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds the rendezvous or any collective may wait (a dead or stuck rank) before failing")

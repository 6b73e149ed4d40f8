"""A training run's checkpoints as functions of explicit state: what a checkpoint holds, writing
and pruning this run's own, and resuming one exactly (or refusing it) — collective over the
ranks of a job.

A checkpoint folder holds the adapter (``save_pretrained``, loadable on its own) and
``trainer_state.pt``: trainable parameters and optimizer states as whole tensors (gathered
from FSDP shards), schedulers, step, data-stream positions, every rank's RNG state, the
history, the config, the run id and the list of checkpoints the run wrote — so k steps +
resume + (N − k) steps equals N steps bit for bit, under any world size.

Three records travel in and out of these functions; nothing here holds a trainer:

* :class:`RunState` — the run's own bookkeeping (step, history, run id, its checkpoints):
  passed to :func:`save_checkpoint` and returned, updated, by it and :func:`load_checkpoint`.
* :class:`Trainables` — the live objects whose state a checkpoint saves and restores in place.
* :class:`RunSetup` — what decides the run's trajectory; a resume must match it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from iapt_fast.atomic import atomic_directory, atomic_write_text, committed_file, remove_leftovers, remove_tree
from iapt_fast.config import IAPTConfig
from iapt_fast.model.adapter_io import save_adapter as write_adapter
from iapt_fast.training.batches import BatchStream
from iapt_fast.training.checkpoints import (RUN_NAME, STATE_NAME, ResumeRefused, check_output_dir, check_resume_config,
                                            find_resumable, latest_checkpoint, read_state, run_id_of, start_run)
from iapt_fast.training.dist_context import DistContext
from iapt_fast.training.parallel import (copy_into, full_optimizer_state, full_tensor, gathered_adapter,
                                         load_optimizer)
from iapt_fast.training.train_config import TrainConfig

__all__ = ["RunState", "RunSetup", "Trainables", "save_checkpoint", "load_checkpoint", "check_checkpoint",
           "start_fresh", "resolve_resume", "adopt_output_dir", "rng_state", "set_rng_state"]


@dataclass
class RunState:
    """What a checkpoint records of the run itself, besides tensors.

    Attributes:
        step: optimizer steps done.
        history: the logged records (training loss, evaluations), oldest first.
        run_id: the run that owns the output folder (set on a fresh start or a resume).
        checkpoints: names of the folders in output_dir this run wrote, oldest first: the
            only ones it prunes.
    """

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    run_id: str | None = None
    checkpoints: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Trainables:
    """The live objects a checkpoint saves and :func:`load_checkpoint` restores in place.

    ``param_names``: the trainable parameters of ``model``, by name (the optimizers' order).
    """

    model: nn.Module
    param_names: Sequence[str]
    optimizers: Mapping[str, torch.optim.Optimizer]
    schedulers: Mapping[str, torch.optim.lr_scheduler.LRScheduler]
    train_stream: BatchStream
    dev_stream: BatchStream | None = None


@dataclass(frozen=True)
class RunSetup:
    """What decides a run's trajectory (a resume must match it) and where it writes.

    ``max_steps`` / ``warmup_steps``: as resolved from the config and the data size;
    ``fingerprint``: the run's data fingerprint (:mod:`iapt_fast.training.fingerprint`).
    """

    config: TrainConfig
    max_steps: int
    warmup_steps: int
    fingerprint: Mapping[str, Any]


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from (Python, NumPy, torch CPU and CUDA)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ saving
def save_checkpoint(run: RunState, parts: Trainables, setup: RunSetup, ctx: DistContext,
                    path: str | None = None) -> tuple[str, RunState]:
    """Adapter (``save_pretrained``) + ``trainer_state.pt`` into ``path`` (default:
    ``<output_dir>/checkpoint-<step>``), atomically, then prune this run's old checkpoints
    beyond ``save_total_limit``; collective.

    Gathered from every rank and written by rank 0, in the single-process format; every
    rank's RNG state is kept, so a resume on the same world size continues each rank's random
    stream (dropout) exactly. Returns the folder and ``run`` with its checkpoint list updated.
    """
    cfg = setup.config
    path = os.path.abspath(path or os.path.join(cfg.output_dir, f"checkpoint-{run.step}"))
    listed = _listed_after(run.checkpoints, path, cfg.output_dir)
    named = dict(parts.model.named_parameters())
    params = {n: full_tensor(named[n].detach()).cpu().clone() for n in parts.param_names}
    optimizers = {k: full_optimizer_state(o) for k, o in parts.optimizers.items()}
    sharded = ctx.strategy == "fsdp" and hasattr(parts.model, "generators")
    adapter = gathered_adapter(parts.model) if sharded else None
    rngs = ctx.all_gather(rng_state())
    state = {
        "step": run.step,
        "max_steps": setup.max_steps,
        "warmup_steps_resolved": setup.warmup_steps,
        "bilevel": cfg.bilevel,
        "params": params,
        "optimizers": optimizers,
        "schedulers": {k: s.state_dict() for k, s in parts.schedulers.items()},
        "train_stream": parts.train_stream.state_dict(),
        "dev_stream": parts.dev_stream.state_dict() if parts.dev_stream is not None else None,
        "rng": rngs[0],
        "rng_per_rank": rngs,
        "world_size": ctx.world_size,
        "history": run.history,
        "config": cfg.to_dict(),
        "run_id": run.run_id,
        "checkpoints": listed,
        "fingerprint": dict(setup.fingerprint),
    }
    if ctx.is_main:
        _write(path, state, parts.model, adapter)
    kept = _prune(listed, cfg.save_total_limit, cfg.output_dir, keep=os.path.basename(path), delete=ctx.is_main)
    if ctx.is_main:
        # What killed saves and prunes of this run left (one writer per output folder).
        remove_leftovers(cfg.output_dir, "checkpoint-*")
    ctx.barrier()
    return path, dataclasses.replace(run, checkpoints=kept)


def _listed_after(own: list[str], path: str, output_dir: str) -> list[str]:
    """This run's checkpoint list once ``path`` is written (folders in output_dir only)."""
    if os.path.dirname(path) != os.path.abspath(output_dir):
        return list(own)
    name = os.path.basename(path)
    return [n for n in own if n != name] + [name]


def _write(path: str, state: dict[str, Any], model: nn.Module, adapter: Any) -> None:
    """Adapter + trainer state into ``path`` in one commit: a crash leaves the old checkpoint or
    the new one, complete."""
    with atomic_directory(path) as tmp:
        if adapter is not None:
            write_adapter(adapter, tmp)
        elif hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp)
        torch.save(state, os.path.join(tmp, STATE_NAME))


def _prune(own: list[str], limit: int | None, output_dir: str, keep: str, delete: bool) -> list[str]:
    """Drop this run's oldest checkpoints beyond ``limit`` (never another run's, never ``keep``);
    ``delete``: remove their folders too (rank 0 only). Returns the names still kept."""
    if limit is None or len(own) <= limit:
        return list(own)
    drop = [n for n in own[:-limit] if n != keep]
    for name in drop if delete else ():
        # Moved aside first: a crash mid-delete never leaves a torn checkpoint-N to resume.
        remove_tree(os.path.join(output_dir, name))
    return [n for n in own if n not in drop]


# ------------------------------------------------------------------------------ resuming
def check_checkpoint(path: str, state: Mapping[str, Any], parts: Trainables, setup: RunSetup) -> None:
    """Raise ValueError (:class:`~iapt_fast.training.checkpoints.ResumeRefused` for other
    settings or data) when this run cannot continue checkpoint ``path`` exactly, naming what
    differs."""
    check_resume_config(path, state, setup.config.to_dict(), setup.max_steps, setup.warmup_steps, setup.fingerprint)
    named = dict(parts.model.named_parameters())
    missing = [n for n in parts.param_names if n not in state["params"]]
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks trainable parameters {missing[:3]} (was it written for "
                         "another model or adapter?)")
    for n in parts.param_names:
        want, got = tuple(named[n].shape), tuple(state["params"][n].shape)  # a DTensor's shape is the whole one
        if want != got:
            raise ValueError(f"checkpoint {path!r}: {n} has shape {got}, this model's is {want}: the adapter was "
                             "built with another num_soft_tokens / bottleneck_dim / rational degrees; resume "
                             "with the checkpoint's adapter settings")
    saved = committed_file(path, "adapter_config.json")
    peft_config = getattr(parts.model, "peft_config", None)
    active = getattr(parts.model, "active_adapter", None)
    if os.path.isfile(saved) and isinstance(peft_config, Mapping) and active in peft_config:
        theirs = IAPTConfig.from_pretrained(os.path.dirname(saved)).to_dict()
        ours = peft_config[active].to_dict()
        diffs = [f"{k}: checkpoint {theirs[k]!r}, this run {ours.get(k)!r}" for k in theirs
                 if k != "base_model_name_or_path" and theirs[k] != ours.get(k)]
        if diffs:
            raise ValueError(f"checkpoint {path!r} was trained with another adapter config: " + "; ".join(diffs))


def load_checkpoint(path: str, parts: Trainables, setup: RunSetup, ctx: DistContext,
                    state: Mapping[str, Any] | None = None) -> RunState:
    """Restore into ``parts`` everything :func:`save_checkpoint` wrote (by any world size) and
    return the run's state, so the next step continues exactly; collective.

    ``state``: the checkpoint's trainer state when already read. Raises FileNotFoundError
    naming the file for a missing state, and
    :class:`~iapt_fast.training.checkpoints.ResumeRefused` (a ValueError) naming the file for
    a corrupt or truncated one and every difference for a checkpoint of another configuration
    or data; nothing is changed then. Every rank raises together.
    """
    file = committed_file(path, STATE_NAME)
    (blind,) = ctx.all_reduce_sum([0 if os.path.isfile(file) else 1])
    if blind:
        raise FileNotFoundError(
            f"no {STATE_NAME} in {path!r}" + ("" if not ctx.enabled else
            f" ({int(blind)} of {ctx.world_size} rank(s); rank 0 writes checkpoints: multi-node resume "
            "needs the output folder on a shared filesystem)"))
    error = None
    try:
        state = read_state(path) if state is None else state
        check_checkpoint(path, state, parts, setup)
    except ValueError as err:
        error = str(err)
    error = ctx.first_error(error)
    if error is not None:
        raise ResumeRefused(error)
    named = dict(parts.model.named_parameters())
    with torch.no_grad():
        for n in parts.param_names:
            copy_into(named[n], state["params"][n])
    for k, o in parts.optimizers.items():
        load_optimizer(o, state["optimizers"][k])
    for k, s in parts.schedulers.items():
        s.load_state_dict(state["schedulers"][k])
    parts.train_stream.load_state_dict(state["train_stream"])
    if parts.dev_stream is not None:
        parts.dev_stream.load_state_dict(state["dev_stream"])
    rngs = state.get("rng_per_rank")
    same_world = rngs is not None and state.get("world_size") == ctx.world_size
    set_rng_state(rngs[ctx.rank] if same_world else state["rng"])
    return RunState(step=int(state["step"]), history=list(state["history"]), run_id=state.get("run_id"),
                    checkpoints=list(state.get("checkpoints", [])))


def start_fresh(config: TrainConfig, ctx: DistContext, resume_auto: bool = False) -> RunState:
    """Claim ``config.output_dir`` for a new run (refusing another run's output), seed, and
    return the new run's state; collective.

    ``resume_auto``: a resume was asked for and found no checkpoint (the refusal says so).
    Raises ValueError for a path that cannot be a folder and
    :class:`~iapt_fast.training.checkpoints.OutputDirNotEmpty` for another run's output — on
    every rank, the error of the first rank that found one.
    """
    error: ValueError | None = None
    try:
        check_output_dir(config.output_dir, config.overwrite_output_dir, resume_auto=resume_auto)
    except ValueError as err:
        error = err
    # Every rank checks before rank 0 writes its marker; the exception travels whole, its class included.
    first = next((e for e in ctx.all_gather(error) if e is not None), None)
    if first is not None:
        raise first
    run_id = None
    if ctx.is_main:
        os.makedirs(config.output_dir, exist_ok=True)
        run_id = start_run(config.output_dir)
    run = RunState(run_id=ctx.broadcast(run_id))
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    return run


def resolve_resume(resume_from: str | None, output_dir: str,
                   ctx: DistContext) -> tuple[str | None, Mapping[str, Any] | None]:
    """The checkpoint folder to resume (and its state when already read): ``"auto"`` is this
    run's newest readable checkpoint in ``output_dir``, found by rank 0 for every rank."""
    if resume_from != "auto":
        return resume_from, None
    if not ctx.enabled:
        found = find_resumable(output_dir)
        return found if found is not None else (None, None)
    return ctx.broadcast(latest_checkpoint(output_dir) if ctx.is_main else None), None


def adopt_output_dir(output_dir: str, run_id: str | None, ctx: DistContext) -> None:
    """A run resumed into a folder without a marker claims it under its own id; collective."""
    if ctx.is_main and run_id is not None and run_id_of(output_dir) is None:
        os.makedirs(output_dir, exist_ok=True)
        atomic_write_text(os.path.join(output_dir, RUN_NAME), json.dumps({"run_id": run_id}) + "\n")
    ctx.barrier()

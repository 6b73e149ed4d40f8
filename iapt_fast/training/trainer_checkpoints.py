"""A Trainer's checkpoints: what a checkpoint holds, writing and pruning this run's own, and
resuming one exactly (or refusing it) — collective over the ranks of a job.

A checkpoint folder holds the adapter (``save_pretrained``, loadable on its own) and
``trainer_state.pt``: trainable parameters and optimizer states as whole tensors (gathered
from FSDP shards), schedulers, step, data-stream positions, every rank's RNG state, the
history, the config, the run id and the list of checkpoints the run wrote — so k steps +
resume + (N − k) steps equals N steps bit for bit, under any world size.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import TYPE_CHECKING, Any, Mapping

import torch

from iapt_fast.atomic import atomic_directory, atomic_write_text
from iapt_fast.training.checkpoints import (RUN_NAME, STATE_NAME, OutputDirNotEmpty, check_output_dir,
                                            check_resume_config, find_resumable, latest_checkpoint, read_state,
                                            run_id_of, start_run)
from iapt_fast.training.parallel import (copy_into, full_optimizer_state, full_tensor, gathered_adapter,
                                         load_optimizer)

if TYPE_CHECKING:  # pragma: no cover
    from iapt_fast.training.trainer import Trainer

__all__ = ["TrainerCheckpoints", "rng_state", "set_rng_state"]


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
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainerCheckpoints:
    """The checkpoint side of one :class:`~iapt_fast.training.trainer.Trainer` (``trainer.checkpoints``).

    Attributes:
        run_id: the run this trainer continues (set when training starts fresh or resumes).
        own_checkpoints: the folders this run wrote, oldest first: the only ones it prunes.
    """

    def __init__(self, trainer: "Trainer") -> None:
        self.trainer = trainer
        self.run_id: str | None = None
        self.own_checkpoints: list[str] = []

    def state_dict(self, path: str, params: dict[str, torch.Tensor], optimizers: dict[str, Any],
                          rng: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """Everything a resume needs; ``params`` / ``optimizers`` as whole (gathered) tensors."""
        return {
            "step": self.trainer.step,
            "max_steps": self.trainer.max_steps,
            "warmup_steps_resolved": self.trainer.warmup_steps,
            "bilevel": self.trainer.config.bilevel,
            "params": params,
            "optimizers": optimizers,
            "schedulers": {k: s.state_dict() for k, s in self.trainer.schedulers.items()},
            "train_stream": self.trainer.train_stream.state_dict(),
            "dev_stream": self.trainer.dev_stream.state_dict() if self.trainer.dev_stream else None,
            "rng": rng,
            "history": self.trainer.history,
            "config": self.trainer.config.to_dict(),
            "run_id": self.run_id,
            "checkpoints": self.own_after(path),
            **extra,
        }

    def path_for(self, path: str | None) -> str:
        return os.path.abspath(path or os.path.join(self.trainer.config.output_dir, f"checkpoint-{self.trainer.step}"))

    def own_after(self, path: str) -> list[str]:
        """This run's checkpoint list once ``path`` is written (folders in output_dir only)."""
        if os.path.dirname(path) != os.path.abspath(self.trainer.config.output_dir):
            return list(self.own_checkpoints)
        name = os.path.basename(path)
        return [n for n in self.own_checkpoints if n != name] + [name]

    def write(self, path: str, state: dict[str, Any], adapter: Any = None) -> None:
        """Adapter + trainer state into ``path`` by one rename, then prune this run's old ones."""
        with atomic_directory(path) as tmp:
            if adapter is not None:
                from iapt_fast.model.adapter_io import save_adapter as write_adapter
                write_adapter(adapter, tmp)
            elif hasattr(self.trainer.model, "save_pretrained"):
                self.trainer.model.save_pretrained(tmp)
            torch.save(state, os.path.join(tmp, STATE_NAME))
        self.own_checkpoints = state["checkpoints"]
        self.prune(keep=os.path.basename(path))

    def save(self, path: str | None = None) -> str:
        """Adapter (``save_pretrained``) + ``trainer_state.pt`` into ``checkpoint-<step>``, atomically.

        Gathered from every rank and written by rank 0, in the single-process format; every
        rank's RNG state is kept, so a resume on the same world size continues each rank's
        random stream (dropout) exactly.
        """
        path = self.path_for(path)
        named = dict(self.trainer.model.named_parameters())
        params = {n: full_tensor(named[n].detach()).cpu().clone() for n in self.trainer.param_names}
        optimizers = {k: full_optimizer_state(o) for k, o in self.trainer.optimizers.items()}
        adapter = gathered_adapter(self.trainer.model) if self.trainer._sharded and hasattr(self.trainer.model, "generators") else None
        rngs = self.trainer.ctx.all_gather(rng_state())
        state = self.state_dict(path, params, optimizers, rngs[0], rng_per_rank=rngs,
                                       world_size=self.trainer.ctx.world_size)
        if self.trainer.ctx.is_main:
            self.write(path, state, adapter)
        else:
            self.own_checkpoints = state["checkpoints"]
            self.prune(keep=os.path.basename(path), delete=False)  # rank 0 deletes
        self.trainer.ctx.barrier()
        return path

    def prune(self, keep: str, delete: bool = True) -> None:
        """Delete this run's oldest checkpoints beyond ``save_total_limit`` (never another run's)."""
        limit = self.trainer.config.save_total_limit
        if limit is None or len(self.own_checkpoints) <= limit:
            return
        drop = [n for n in self.own_checkpoints[:-limit] if n != keep]
        for name in drop if delete else ():
            shutil.rmtree(os.path.join(self.trainer.config.output_dir, name), ignore_errors=True)
        self.own_checkpoints = [n for n in self.own_checkpoints if n not in drop]

    def check(self, path: str, state: Mapping[str, Any]) -> None:
        """Refuse a checkpoint this run cannot continue exactly, naming what differs."""
        check_resume_config(path, state, self.trainer.config.to_dict(), self.trainer.max_steps, self.trainer.warmup_steps)
        named = dict(self.trainer.model.named_parameters())
        missing = [n for n in self.trainer.param_names if n not in state["params"]]
        if missing:
            raise ValueError(f"checkpoint {path!r} lacks trainable parameters {missing[:3]} (was it written for "
                             "another model or adapter?)")
        for n in self.trainer.param_names:
            want, got = tuple(named[n].shape), tuple(state["params"][n].shape)  # a DTensor's shape is the whole one
            if want != got:
                raise ValueError(f"checkpoint {path!r}: {n} has shape {got}, this model's is {want}: the adapter was "
                                 "built with another num_soft_tokens / bottleneck_dim / rational degrees; resume "
                                 "with the checkpoint's adapter settings")
        saved = os.path.join(path, "adapter_config.json")
        peft_config = getattr(self.trainer.model, "peft_config", None)
        active = getattr(self.trainer.model, "active_adapter", None)
        if os.path.isfile(saved) and isinstance(peft_config, Mapping) and active in peft_config:
            from iapt_fast.config import IAPTConfig
            theirs = IAPTConfig.from_pretrained(path).to_dict()
            ours = peft_config[active].to_dict()
            diffs = [f"{k}: checkpoint {theirs[k]!r}, this run {ours.get(k)!r}" for k in theirs
                     if k != "base_model_name_or_path" and theirs[k] != ours.get(k)]
            if diffs:
                raise ValueError(f"checkpoint {path!r} was trained with another adapter config: " + "; ".join(diffs))

    def load(self, path: str, state: Mapping[str, Any] | None = None) -> None:
        """Restore everything ``save_checkpoint`` wrote (by any world size); the next step
        continues exactly.

        Raises FileNotFoundError / ValueError naming the file for a missing, corrupt or
        truncated state, and naming every difference for a checkpoint of another
        configuration; nothing is changed then. Every rank raises together.
        """
        file = os.path.join(path, STATE_NAME)
        (blind,) = self.trainer.ctx.all_reduce_sum([0 if os.path.isfile(file) else 1])
        if blind:
            raise FileNotFoundError(
                f"no {STATE_NAME} in {path!r}" + ("" if not self.trainer.ctx.enabled else
                f" ({int(blind)} of {self.trainer.ctx.world_size} rank(s); rank 0 writes checkpoints: multi-node resume "
                "needs the output folder on a shared filesystem)"))
        error = None
        try:
            state = read_state(path) if state is None else state
            self.check(path, state)
        except ValueError as err:
            error = str(err)
        error = self.trainer.ctx.first_error(error)
        if error is not None:
            raise ValueError(error)
        named = dict(self.trainer.model.named_parameters())
        with torch.no_grad():
            for n in self.trainer.param_names:
                copy_into(named[n], state["params"][n])
        for k, o in self.trainer.optimizers.items():
            load_optimizer(o, state["optimizers"][k])
        rngs = state.get("rng_per_rank")
        same_world = rngs is not None and state.get("world_size") == self.trainer.ctx.world_size
        self._restore_common(state, rngs[self.trainer.ctx.rank] if same_world else state["rng"])

    def _restore_common(self, state: Mapping[str, Any], rng: Mapping[str, Any]) -> None:
        for k, s in self.trainer.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.trainer.train_stream.load_state_dict(state["train_stream"])
        if self.trainer.dev_stream is not None:
            self.trainer.dev_stream.load_state_dict(state["dev_stream"])
        set_rng_state(rng)
        self.trainer.step = int(state["step"])
        self.trainer.history = list(state["history"])
        self.run_id = state.get("run_id")
        self.own_checkpoints = list(state.get("checkpoints", []))

    def start_fresh(self) -> None:
        """Claim the output folder for a new run (refusing another run's output) and seed."""
        cfg = self.trainer.config
        try:
            check_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
            error = None
        except OutputDirNotEmpty as err:
            error = str(err)
        error = self.trainer.ctx.first_error(error)  # every rank checks before rank 0 writes its marker
        if error is not None:
            raise OutputDirNotEmpty(error)
        run_id = None
        if self.trainer.ctx.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            run_id = start_run(cfg.output_dir)
        self.run_id = self.trainer.ctx.broadcast(run_id)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

    def resolve_resume(self, resume_from: str | None) -> tuple[str | None, Mapping[str, Any] | None]:
        """``"auto"``: this run's newest readable checkpoint, found by rank 0 for every rank."""
        if resume_from != "auto":
            return resume_from, None
        if not self.trainer.ctx.enabled:
            found = find_resumable(self.trainer.config.output_dir)
            return found if found is not None else (None, None)
        return self.trainer.ctx.broadcast(latest_checkpoint(self.trainer.config.output_dir) if self.trainer.ctx.is_main else None), None

    def adopt_output_dir(self) -> None:
        """A run resumed into a folder without a marker claims it under its own id."""
        if self.trainer.ctx.is_main and self.run_id is not None and run_id_of(self.trainer.config.output_dir) is None:
            os.makedirs(self.trainer.config.output_dir, exist_ok=True)
            atomic_write_text(os.path.join(self.trainer.config.output_dir, RUN_NAME), json.dumps({"run_id": self.run_id}) + "\n")
        self.trainer.ctx.barrier()

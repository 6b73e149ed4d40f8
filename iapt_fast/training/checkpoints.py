"""Training checkpoints on disk: which run owns a folder, which checkpoint to resume, and
whether a checkpoint fits the run that wants to resume it.

An output folder belongs to one run at a time. A fresh run writes ``iapt_run.json`` (its run
id) into it, and every checkpoint's ``trainer_state.pt`` carries the id of the run that wrote
it, so:

* a fresh run refuses a folder that holds another run's output unless told to overwrite it
  (as transformers' ``overwrite_output_dir``), or to resume it;
* ``resume="auto"`` only considers checkpoints of the run the folder belongs to, newest
  first, skipping (and naming) any whose state cannot be read;
* a run prunes only checkpoints it wrote itself (its list travels in the state, so a
  resumed run keeps pruning its own history).
"""
from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from typing import Any, Mapping

import torch

from iapt_fast.atomic import atomic_write_text, committed_file
from iapt_fast.training.fingerprint import fingerprint_diffs

__all__ = ["STATE_NAME", "RUN_NAME", "TRAJECTORY_FIELDS", "TrainingInterrupted", "OutputDirNotEmpty", "ResumeRefused",
           "read_state", "find_resumable", "latest_checkpoint", "check_output_dir", "check_output_path", "start_run",
           "run_id_of", "check_resume_config", "checkpoint_steps"]

STATE_NAME = "trainer_state.pt"
RUN_NAME = "iapt_run.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_REQUIRED_KEYS = ("step", "max_steps", "bilevel", "params", "optimizers", "schedulers", "train_stream", "rng",
                  "history", "config")
# TrainConfig fields that decide what the next step computes: a resumed run must agree on them.
# (Where and how often it logs, evaluates or saves may change.)
TRAJECTORY_FIELDS = ("batch_size", "grad_accum", "lr", "rational_lr", "anchor_lr", "pool_lr_scale", "lr_schedule", "weight_decay",
                     "adam_betas", "max_grad_norm", "precision", "bilevel", "seed")


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGTERM / SIGINT after writing a checkpoint; resume it to continue.

    Attributes:
        signum: the signal number; ``checkpoint``: the folder written; ``step``: steps done.
    """

    def __init__(self, signum: int, checkpoint: str, step: int) -> None:
        import signal

        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        name = signal.Signals(signum).name
        super().__init__(f"training interrupted by {name} after step {step}; checkpoint written to {checkpoint!r} "
                         "(resume with resume_from='auto' / --resume auto)")


class OutputDirNotEmpty(ValueError):
    """A fresh run was pointed at a folder holding another run's output."""


class ResumeRefused(ValueError):
    """A checkpoint cannot be continued exactly by this run (unreadable, or written with other
    hyper-parameters, adapter settings or data); the message names every difference."""


def checkpoint_steps(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every ``checkpoint-N`` folder in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (m := _CKPT_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return sorted(found)


def read_state(path: str) -> dict[str, Any]:
    """The trainer state of checkpoint folder ``path``, checked to be complete.

    Raises:
        FileNotFoundError: no ``trainer_state.pt`` in ``path``.
        ValueError: the file is empty, truncated, corrupt or not a trainer state.
    """
    file = committed_file(path, STATE_NAME)  # a save interrupted after its commit point: the new state
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {STATE_NAME} in {path!r}")
    if os.path.getsize(file) == 0:
        raise ValueError(f"{file!r} is empty (0 bytes): the checkpoint was not written completely")
    try:
        # weights_only=False: the state holds Python RNG tuples; it is our own file.
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a torn zip / pickle
        raise ValueError(f"{file!r} is truncated or corrupt ({type(err).__name__}: {err}); resume from another "
                         "checkpoint or delete this one") from err
    if not isinstance(state, Mapping) or any(k not in state for k in _REQUIRED_KEYS):
        missing = [k for k in _REQUIRED_KEYS if not isinstance(state, Mapping) or k not in state]
        raise ValueError(f"{file!r} is not an iapt_fast trainer state (missing {missing})")
    return dict(state)


def run_id_of(output_dir: str) -> str | None:
    """The id of the run ``output_dir`` belongs to (None: no marker, e.g. an older folder)."""
    path = os.path.join(output_dir, RUN_NAME)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data.get("run_id") if isinstance(data, dict) else None


def find_resumable(output_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint of ``output_dir``'s own run whose state reads, with that state.

    Checkpoints of other runs (another run id) are ignored; unreadable ones are skipped with
    a warning that names them, so a crash during a save costs one checkpoint, not the run.
    """
    owner = run_id_of(output_dir)
    skipped = []
    for _, path in reversed(checkpoint_steps(output_dir)):
        if not os.path.isfile(committed_file(path, STATE_NAME)):
            continue
        try:
            state = read_state(path)
        except ValueError as err:
            skipped.append(str(err))
            continue
        if owner is not None and state.get("run_id") not in (None, owner):
            continue
        if skipped:
            warnings.warn(f"resume: skipped unreadable checkpoints, resuming {path!r}: " + "; ".join(skipped),
                          stacklevel=2)
        return path, state
    if skipped:
        warnings.warn("resume: no readable checkpoint (" + "; ".join(skipped) + "); starting fresh", stacklevel=2)
    return None


def latest_checkpoint(output_dir: str) -> str | None:
    """Path of the checkpoint ``resume="auto"`` would continue, or None."""
    found = find_resumable(output_dir)
    return found[0] if found else None


def check_output_path(output_dir: str) -> None:
    """Raise ValueError unless ``output_dir`` is a folder or can be created as one."""
    path = os.path.abspath(output_dir)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"output_dir {output_dir!r} is a file, not a folder: give a folder for the adapter, "
                         "checkpoints and metrics (a missing one is created)")
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ValueError(f"output_dir {output_dir!r} cannot be created: {path!r} is a file, not a folder")


def check_output_dir(output_dir: str, overwrite: bool, resume_auto: bool = False) -> None:
    """Refuse a fresh run in a folder holding another run's output, unless ``overwrite``.

    A folder is free when it is missing, empty, or holds only the marker of a run that never
    wrote anything (killed before its first checkpoint). ``resume_auto``: the run asked to
    resume and found no checkpoint to continue (the message says so).
    """
    check_output_path(output_dir)
    if overwrite or not os.path.isdir(output_dir):
        return
    held = sorted(e for e in os.listdir(output_dir) if e != RUN_NAME and not e.startswith("."))
    if held and resume_auto:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        finished = " (metrics.json: the run finished)" if "metrics.json" in held else ""
        raise OutputDirNotEmpty(
            f"resume_from='auto' (--resume auto) found nothing to continue in output_dir {output_dir!r}: it holds "
            f"{shown}{finished} but no readable checkpoint of its run. To train again, pick another folder for the "
            "new run, or start over in this one with overwrite_output_dir=True (--overwrite-output-dir)")
    if held:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise OutputDirNotEmpty(
            f"output_dir {output_dir!r} already holds a run's output ({shown}); resume it (resume_from='auto', "
            "--resume auto), start over in it (overwrite_output_dir=True, --overwrite-output-dir: checkpoints "
            "of the old run are then never resumed or pruned), or pick another folder")


def start_run(output_dir: str) -> str:
    """Claim ``output_dir`` for a new run; returns the run id."""
    run_id = uuid.uuid4().hex
    atomic_write_text(os.path.join(output_dir, RUN_NAME), json.dumps({"run_id": run_id}) + "\n")
    return run_id


def check_resume_config(path: str, state: Mapping[str, Any], config: Mapping[str, Any], max_steps: int,
                        warmup_steps: int, fingerprint: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`ResumeRefused` naming every hyper-parameter, and every entry of the data
    ``fingerprint`` (see :mod:`iapt_fast.training.fingerprint`), in which this run differs
    from the checkpoint's."""
    saved = state["config"]
    diffs = []
    for name in TRAJECTORY_FIELDS:
        if name in saved and _plain(saved[name]) != _plain(config[name]):
            diffs.append(f"{name}: checkpoint {saved[name]!r}, this run {config[name]!r}")
    if state["max_steps"] != max_steps:
        diffs.append(f"max_steps: checkpoint {state['max_steps']}, this run {max_steps} (the learning-rate "
                     "schedule would differ)")
    if "warmup_steps_resolved" in state and state["warmup_steps_resolved"] != warmup_steps:
        diffs.append(f"warm-up steps: checkpoint {state['warmup_steps_resolved']}, this run {warmup_steps}")
    data = fingerprint_diffs(state.get("fingerprint"), fingerprint or {})
    if diffs or data:
        what = " and ".join(w for w, d in (("training hyper-parameters", diffs), ("data or data preparation", data)) if d)
        raise ResumeRefused(f"cannot resume {path!r} with other {what} (a resumed run would mix two set-ups; "
                            "nothing is applied silently): " + "; ".join(diffs + data) + ". Resume with the "
                            "original values, or start a new run in another output folder")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value

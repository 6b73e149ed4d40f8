"""Where a process stands in a (possibly distributed) job, and the few collectives training needs.

``DistContext("none")`` is the single-process context: every collective is the identity, so
the one Trainer runs unchanged alone or under ``torchrun`` / ``accelerate launch`` (DDP, FSDP2).
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

__all__ = ["STRATEGIES", "DEFAULT_TIMEOUT_S", "DistContext", "SINGLE_PROCESS", "resolve_strategy", "init_distributed",
           "shutdown", "barrier", "all_reduce_sum", "all_reduce_max", "broadcast_object"]

STRATEGIES = ("auto", "none", "ddp", "fsdp")
# torch's own default for NCCL is 10 min, accelerate's 30; a collective that waits this long
# means a peer died or hangs, so we fail rather than wait on.
DEFAULT_TIMEOUT_S = 1800.0
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_LAUNCH_HINT = ("start one process per device with `torchrun --nproc_per_node N -m iapt_fast.train ...` "
                "or `accelerate launch --num_processes N -m iapt_fast.train ...`")



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

    # Collectives: identities for one process, so one training loop serves every strategy.
    def barrier(self) -> None:
        barrier(self)

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        return all_reduce_sum(values, self)

    def all_reduce_max(self, values: Sequence[float]) -> list[float]:
        return all_reduce_max(values, self)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return broadcast_object(obj, self)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def first_error(self, error: str | None) -> str | None:
        """The first rank's error message, on every rank (so all raise together, none waits)."""
        return next((e for e in self.all_gather(error) if e is not None), None)


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
    wanted = _wanted_device(device)
    cuda = torch.cuda.is_available() if wanted is None else wanted.type == "cuda"
    if resolved == "none":
        single = wanted if wanted is not None else torch.device("cuda" if cuda else "cpu")
        return DistContext("none", device=single, timeout_s=float(timeout_s))
    import torch.distributed as dist

    launch = _launch_env(env)
    assert launch is not None  # resolve_strategy guarantees it
    rank, world, local = launch["RANK"], launch["WORLD_SIZE"], launch["LOCAL_RANK"]
    device = _rank_device(cuda, local)
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


def _wanted_device(device: str | torch.device | None) -> torch.device | None:
    """The device a caller forces (cpu or an available cuda), or None."""
    try:
        wanted = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device: {err}") from None
    if wanted is not None and wanted.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a cpu or cuda device, got {device!r}")
    if wanted is not None and wanted.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return wanted


def _rank_device(cuda: bool, local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` (made current) under a launcher with CUDA, else the CPU."""
    if not cuda:
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                           "visible; start at most one process per device")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def shutdown(ctx: DistContext | None) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if ctx is None or not ctx.owns_group:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist
        dist.barrier()


def all_reduce_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Sum a few float64 scalars over the ranks (identity for one process)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    import torch.distributed as dist

    # The scalars travel on the rank's device: NCCL cannot reduce CPU tensors.
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_reduce_max(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Maximum of a few scalars over the ranks (identity for one process)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=ctx.device)
    return box[0]


SINGLE_PROCESS = DistContext("none")

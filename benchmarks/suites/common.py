"""Shared machinery of the suites: result rows, timing, peak memory, the time budget.

Every measured case becomes a row, whatever happens: a case that raises is recorded as
``failed`` with its error, a case that the time budget no longer allows as ``skipped`` with
the reason. Nothing is silently dropped.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
import traceback
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

STATUSES = ("ok", "failed", "skipped")


@dataclass
class Row:
    """One measured case. ``metrics`` holds numbers only; ``params`` describes the case."""

    suite: str
    case: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    error: str | None = None
    traceback: str | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Budget:
    """Wall-clock budget of a whole run; cases that would start after it are skipped."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def remaining(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def skip_reason(self, estimate_s: float | None = None) -> str | None:
        """Why a case must not start now (None: it may), given its estimated duration."""
        if self.exhausted():
            return f"time budget of {self.seconds:.0f} s exhausted before this case started"
        if estimate_s is not None and estimate_s > self.remaining():
            return (f"would not fit the time budget: estimated {estimate_s:.0f} s, "
                    f"{self.remaining():.0f} s of {self.seconds:.0f} s left")
        return None


def estimate_seconds(history: list[tuple[float, float]], work: float) -> float | None:
    """Duration of a case of size ``work`` from (work, seconds) of the cases measured before.

    A power law through the last two points (exponent clamped to [0.3, 1]: generation cost
    grows sublinearly in the batch, since per-step overheads do not grow with it); linear
    from a single point, which overestimates and so errs on the side of skipping.
    """
    if not history:
        return None
    w1, t1 = history[-1]
    exponent = 1.0
    if len(history) >= 2:
        w0, t0 = history[-2]
        if w0 > 0 and t0 > 0 and w1 != w0:
            exponent = min(1.0, max(0.3, math.log(t1 / t0) / math.log(w1 / w0)))
    return t1 * (work / w1) ** exponent


class Recorder:
    """Collects rows. ``run`` executes one case and turns any exception into a failed row."""

    def __init__(self, budget: Budget | None = None, progress: Any = None) -> None:
        self.rows: list[Row] = []
        self.budget = budget or Budget(None)
        self.progress = progress

    def run(self, suite: str, case: str, method: str, params: dict[str, Any],
            fn: Callable[[], dict[str, float | None]]) -> Row:
        row = Row(suite=suite, case=case, method=method, params=dict(params))
        reason = self.budget.skip_reason()
        if reason is not None:
            row.status = "skipped"
            row.error = reason
        else:
            start = time.perf_counter()
            try:
                row.metrics = {k: _clean(v) for k, v in fn().items()}
            except Exception as err:  # a baseline that throws is a result too: report it
                row.status = "failed"
                row.error = f"{type(err).__name__}: {err}"[:2000]
                row.traceback = "".join(traceback.format_exception(err)[-6:])[-4000:]
            finally:
                release_memory()
            row.seconds = time.perf_counter() - start
        return self._add(row)

    def record(self, suite: str, case: str, method: str, params: dict[str, Any],
               result: dict[str, float | None] | Exception, seconds: float) -> Row:
        """Record a case measured already (e.g. interleaved with others): ok or failed."""
        row = Row(suite=suite, case=case, method=method, params=dict(params), seconds=seconds)
        if isinstance(result, Exception):
            row.status = "failed"
            row.error = f"{type(result).__name__}: {result}"[:2000]
            row.traceback = "".join(traceback.format_exception(result)[-6:])[-4000:]
        else:
            row.metrics = {k: _clean(v) for k, v in result.items()}
        return self._add(row)

    def skip(self, suite: str, case: str, method: str, params: dict[str, Any], reason: str) -> Row:
        return self._add(Row(suite=suite, case=case, method=method, params=dict(params), status="skipped",
                             error=reason))

    def _add(self, row: Row) -> Row:
        self.rows.append(row)
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix_str(f"{row.suite}:{row.case}:{row.method} {row.status}", refresh=False)
        return row

    def fail(self, suite: str, case: str, method: str, params: dict[str, Any], error: str) -> Row:
        """Record a case that cannot even start (e.g. its model failed to build)."""
        return self._add(Row(suite=suite, case=case, method=method, params=dict(params), status="failed",
                             error=error))


def _clean(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Per-call wall times in milliseconds: median and the 10th / 90th percentiles."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}median_ms": self.median_ms, f"{prefix}p10_ms": self.p10_ms,
                f"{prefix}p90_ms": self.p90_ms, f"{prefix}reps": float(self.reps)}


def quantiles(samples_ms: list[float]) -> Timing:
    """Median and 10/90 % quantiles (linear interpolation) of ``samples_ms``."""
    if not samples_ms:
        raise ValueError("samples_ms must not be empty")
    xs = sorted(samples_ms)

    def q(frac: float) -> float:
        pos = frac * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return Timing(statistics.median(xs), q(0.1), q(0.9), len(xs))


def time_cpu(fn: Callable[[], Any], setup: Callable[[], Any] | None = None, warmup: int = 1,
             min_reps: int = 5, max_reps: int = 200, target_s: float = 1.0) -> Timing:
    """timeit-style timing: ``setup`` (untimed) then ``fn`` (timed), repeated.

    Repeats until ``target_s`` of timed work or ``max_reps`` calls, at least ``min_reps``.
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    samples: list[float] = []
    total = 0.0
    while len(samples) < max_reps and (len(samples) < min_reps or total < target_s):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        dt = time.perf_counter() - start
        samples.append(dt * 1e3)
        total += dt
    return quantiles(samples)


def time_cuda(fn: Callable[[], Any], grad_to_none: list[torch.Tensor] | None = None,
              warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    """triton.testing.do_bench (CUDA events, L2 flushed between calls): median, p10, p90."""
    from triton.testing import do_bench

    qs = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.1, 0.9])
    med, p10, p90 = (float(v) for v in qs)
    # do_bench picks its repeat count from the warm-up estimate; it is not returned.
    return Timing(med, p10, p90, reps=-1)


def time_fn(device: torch.device | str, fn: Callable[[], Any], setup: Callable[[], Any] | None = None,
            grad_to_none: list[torch.Tensor] | None = None, target_s: float = 1.0,
            min_reps: int = 5) -> Timing:
    """Time ``fn`` on ``device``: do_bench on CUDA, ``time_cpu`` on the CPU."""
    if torch.device(device).type == "cuda":
        if setup is not None:
            def wrapped() -> None:
                setup()
                fn()
            # setup is cheap (dropping grads); do_bench has no untimed hook but grad_to_none.
            return time_cuda(wrapped, grad_to_none=grad_to_none)
        return time_cuda(fn, grad_to_none=grad_to_none)
    return time_cpu(fn, setup=setup, target_s=target_s, min_reps=min_reps)


def time_calls(device: torch.device | str, fn: Callable[[], Any], reps: int) -> Timing:
    """Wall time of ``reps`` calls of a long-running ``fn`` (e.g. generate), synchronised."""
    samples = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return quantiles(samples)


# ---------------------------------------------------------------------------- memory
MEMORY_NOTE = {
    "cuda": "peak_mem_mb = weights_mb (this method's parameters and buffers, adapters included) + extra_mem_mb "
            "(torch.cuda.max_memory_allocated during the call minus the memory allocated just before it): "
            "the peak of a process that serves this method alone",
    "cpu": "peak_mem_mb = weights_mb (this method's parameters and buffers, adapters included) + extra_mem_mb "
           "(peak bytes of tensors allocated during the call and alive at once, tracked per storage with a "
           "TorchDispatchMode in the warm-up call; kernel-internal scratch is not seen): the peak of a process "
           "that serves this method alone. process_peak_mb: the whole process's peak RSS during that call",
}


def module_mb(module: torch.nn.Module) -> float:
    """Bytes of a module's parameters and buffers (shared storages counted once), in MiB."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total / 2**20


def _proc_status_kb(key: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


@contextmanager
def peak_memory(device: torch.device | str) -> Iterator[dict[str, float | None]]:
    """Peak memory of the body above what was allocated before it: ``extra_mem_mb`` (MiB).

    Also ``process_peak_mb``: the whole process's peak (every model alive included).
    """
    out: dict[str, float | None] = {"process_peak_mb": None, "extra_mem_mb": None}
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out["process_peak_mb"] = peak / 2**20
        out["extra_mem_mb"] = (peak - before) / 2**20
        return
    gc.collect()
    reset = True
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        reset = False
    before = _proc_status_kb("VmRSS")
    yield out
    peak = _proc_status_kb("VmHWM") if reset else None
    if peak is not None and before is not None:
        out["process_peak_mb"] = peak / 1024
        out["extra_mem_mb"] = max(0.0, peak - before) / 1024


def bandwidth_gbs(nbytes: float, median_ms: float) -> float:
    """GB/s (10^9 bytes per second) of moving ``nbytes`` in ``median_ms``: the one definition
    every bandwidth figure uses (a copy counts its bytes read plus written)."""
    return nbytes / (median_ms * 1e-3) / 1e9


def copy_bandwidth_gbs(device: torch.device | str, nbytes: int) -> dict[str, float]:
    """Measured device-to-device copy bandwidth: 2 · nbytes (read + write) per copy."""
    dev = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    timing = time_fn(dev, lambda: dst.copy_(src), target_s=0.5)
    gbs = bandwidth_gbs(2 * src.numel() * 4, timing.median_ms)
    del src, dst
    release_memory()
    return {"copy_gbs": gbs, "copy_bytes": float(nbytes), "copy_median_ms": timing.median_ms}


class _LiveTensorTracker:
    """Counts bytes of tensor storages created under a TorchDispatchMode while they live."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.sizes: dict[int, int] = {}

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if not key or key in self.sizes:
            return
        size = storage.nbytes()
        self.sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self.free, key)

    def free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)


def tensor_peak_mb(fn: Callable[[], Any]) -> float:
    """Peak MiB of tensors allocated by ``fn`` and alive at the same time (CPU memory metric).

    Every op's outputs are recorded through a TorchDispatchMode and released when their
    storage dies; views share their base's storage and count once. Allocations that never
    surface as tensors (kernel-internal scratch) are not seen. It slows ``fn`` down, so it
    runs in a separate, untimed call.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    tracker = _LiveTensorTracker()

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for item in tree_flatten(out)[0]:
                if isinstance(item, torch.Tensor) and item.device.type != "meta":
                    tracker.add(item)
            return out

    with Mode():
        fn()
    return tracker.peak / 2**20


def measure_memory(device: torch.device | str, fn: Callable[[], Any]) -> dict[str, float | None]:
    """Run ``fn`` once and return ``extra_mem_mb`` (see MEMORY_NOTE) and ``process_peak_mb``."""
    if torch.device(device).type == "cuda":
        with peak_memory(device) as mem:
            fn()
        return dict(mem)
    with peak_memory(device) as mem:
        extra = tensor_peak_mb(fn)
    return {"extra_mem_mb": extra, "process_peak_mb": mem["process_peak_mb"]}

"""Host-side launch policy: block sizes, precision switches, the split-N heuristic, and a
recorder that captures every launch (kernel, signature, constexprs, warps) instead of running
it, so the CPU test suite can compile exactly what the host code would launch for sm_90."""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import triton

from iapt_fast.generator.limits import MAX_SOFT_TOKENS

# Streaming kernels: tokens per tile, hidden-dim chunk, padded soft-token width of the dots
# (tl.dot needs every dimension >= 16 on NVIDIA: T <= 16 is padded to 16 in registers only).
STREAM_BLOCK_N = 32
STREAM_BLOCK_D = 128
TP_DOT = MAX_SOFT_TOKENS
# Head and weight-gradient kernels: lines per block and output / reduction tile widths.
LINES_BLOCK = 64
LINES_BLOCK_K = 64
LINES_BLOCK_OUT = 64
NUM_WARPS = 4
# Split-K of the head GEMMs: at least this much K per program.
LINES_MIN_K_PER_SPLIT = 256
# Stand-in SM count when no GPU is visible (H100 SXM has 132).
DEFAULT_SM_COUNT = 132
# Programs per SM the split heuristic aims for.
PROGRAMS_PER_SM = 2

_DTYPE_CODE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
               torch.int32: "i32", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def block_d(dim: int) -> int:
    """Hidden-dim chunk of the streaming kernels: 128, or the next power of two for small d."""
    return min(STREAM_BLOCK_D, max(16, triton.next_power_of_2(dim)))


def lines_per_row(num_tokens: int) -> int:
    return triton.next_power_of_2(num_tokens)


def precision(hidden_dtype: torch.dtype) -> dict:
    """Precision switches for the kernels (see kernels/common.py).

    Returns dict(fwd_split, bwd_split, prec): the forward splits float32 operands into two
    halves of the hidden dtype for float16 and bfloat16; the backward only for bfloat16,
    whose range is float32's (a float16 half of a gradient could overflow); other float32
    dots run as "tf32x3" on the GPU for half-precision inputs, "ieee" otherwise and in the
    interpreter.
    """
    half = hidden_dtype in (torch.float16, torch.bfloat16)
    return {
        "fwd_split": half,
        "bwd_split": hidden_dtype == torch.bfloat16,
        "prec": "tf32x3" if (half and not interpreting()) else "ieee",
    }


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (DEFAULT_SM_COUNT off the GPU)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SM_COUNT


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_splits(batch: int, seq: int, device: torch.device, num_splits: int | None = None) -> tuple[int, int]:
    """(splits S, tiles per split) for the forward: split N only when the batch alone cannot
    fill the GPU (flash-decoding); each split keeps at least one tile."""
    n_tiles = triton.cdiv(seq, STREAM_BLOCK_N)
    if n_tiles == 0:
        return 0, 1
    if num_splits is None:
        target = PROGRAMS_PER_SM * sm_count(device)
        want = 1 if batch >= target else triton.cdiv(target, max(batch, 1))
    else:
        want = int(num_splits)
    want = max(1, min(want, n_tiles))
    per_split = triton.cdiv(n_tiles, want)
    return triton.cdiv(n_tiles, per_split), per_split


# One-launch forward (kernels/generator_fwd_fused.py): bottleneck columns per epilogue step.
FUSED_BLOCK_M = 64
# Cost model of the one-launch forward vs the multi-launch one (design.md §4): the launches it
# saves (GPU-side gap and launch latency each), and what one SM sustains in its per-row
# epilogue: float32 FLOP/s of its dots (tensor cores in "tf32x3" for half-precision hidden
# states, CUDA-core FMAs for float32) and the L2 bandwidth that streams W_down and W_up.
SAVED_LAUNCHES = 4
LAUNCH_GAP_S = 5e-6
SM_FLOPS_HALF = 1.2e12
SM_FLOPS_FP32 = 0.5e12
SM_BYTES_PER_S = 1.0e11


def fused_epilogue_seconds(dim: int, bottleneck: int, hidden_dtype: torch.dtype, weight_bytes: int) -> float:
    """Estimated time of one row's epilogue in one program: two [TP, d]×[d, m] products (TP = 16
    padded soft tokens) and one read of W_down and W_up, whichever bounds it."""
    flops = 4 * TP_DOT * dim * bottleneck
    rate = SM_FLOPS_HALF if hidden_dtype in (torch.float16, torch.bfloat16) else SM_FLOPS_FP32
    return max(flops / rate, 2 * dim * bottleneck * weight_bytes / SM_BYTES_PER_S)


def fused_forward_pays(batch: int, dim: int, bottleneck: int, hidden_dtype: torch.dtype, weight_bytes: int,
                       device: torch.device) -> bool:
    """True when the one-launch forward is expected to beat the multi-launch one.

    Streaming H costs the same in both (same splits, same partials). The difference is the
    epilogue: one program per row runs it in ceil(B / SMs) waves of E each, where the
    multi-launch line GEMMs spread the same work over every SM (B·E / SMs), but pay
    SAVED_LAUNCHES more launches. N does not enter: the crossover is a batch size, for a
    given d·m."""
    if batch <= 0:
        return True
    sms = sm_count(device)
    e = fused_epilogue_seconds(dim, bottleneck, hidden_dtype, weight_bytes)
    fused_extra = e * (triton.cdiv(batch, sms) - batch / sms)
    return fused_extra <= SAVED_LAUNCHES * LAUNCH_GAP_S


def choose_k_splits(tiles: int, k: int, device: torch.device) -> tuple[int, int]:
    """(splits, K per split) so that tiles × splits approaches the programs target, each
    split keeping at least LINES_MIN_K_PER_SPLIT of K."""
    target = PROGRAMS_PER_SM * sm_count(device)
    if tiles >= target or k <= LINES_MIN_K_PER_SPLIT:
        return 1, max(k, 1)
    want = min(triton.cdiv(target, tiles), triton.cdiv(k, LINES_MIN_K_PER_SPLIT))
    per_split = triton.cdiv(k, want)
    return triton.cdiv(k, per_split), per_split


@dataclass
class LaunchSpec:
    """One recorded launch: what triton.compile needs to build it for a GPU target."""
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int
    grid: tuple = field(default=())

    @property
    def name(self) -> str:
        return self.kernel.__name__


_RECORDER: list | None = None
_POISON = False


@contextmanager
def poison_buffers():
    """Within this context every kernel output buffer starts as NaN instead of uninitialised
    memory, so a test can tell an element the kernels forgot to write."""
    global _POISON
    previous, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = previous


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a NaN-filled buffer under poison_buffers()."""
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


@contextmanager
def record_launches():
    """Within this context kernels are not launched; their LaunchSpecs are appended to the
    yielded list (outputs are left uninitialised)."""
    global _RECORDER
    previous, _RECORDER = _RECORDER, []
    try:
        yield _RECORDER
    finally:
        _RECORDER = previous


def _arg_type(name: str, value) -> str:
    if isinstance(value, torch.Tensor):
        if value.dtype not in _DTYPE_CODE:
            raise TypeError(f"kernel argument {name} has unsupported dtype {value.dtype}")
        return "*" + _DTYPE_CODE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"kernel argument {name} has unsupported type {type(value).__name__}")


def launch(kernel, grid: tuple, args: dict, constexprs: dict, num_warps: int = NUM_WARPS) -> None:
    """Launch ``kernel`` with every argument by name (runtime ``args`` and ``constexprs``), or
    record it. The names must be exactly the kernel's parameters: a missing, unknown or repeated
    one is a TypeError here, never a silently shifted argument."""
    if any(g == 0 for g in grid):
        return
    runtime = [n for n in kernel.arg_names if n not in constexprs]
    if set(args) != set(runtime) or set(args) & set(constexprs):
        raise TypeError(f"{kernel.__name__}: missing {sorted(set(runtime) - set(args))}, unknown "
                        f"{sorted(set(args) - set(runtime))}, given twice {sorted(set(args) & set(constexprs))}")
    if _RECORDER is not None:
        types = {n: _arg_type(n, args[n]) for n in runtime}
        signature = {n: types.get(n, "constexpr") for n in kernel.arg_names}
        _RECORDER.append(LaunchSpec(kernel, signature, dict(constexprs), num_warps, tuple(grid)))
        return
    kernel[grid](**args, **constexprs, num_warps=num_warps)

"""Triton helpers shared by every kernel of the generator: dot products with a precision switch.

Every GEMM of the generator has one float32 operand (softmax weights, pooled hidden states,
W_down·W_pool, gradients), so there is no plain bf16×bf16 product to hand to tensor cores.
Two ways to keep float32 accuracy:

* SPLIT (forward streaming kernel, half-precision hidden states on the GPU): the float32
  operand is split into hi + lo halves of the hidden dtype, and two half-precision
  tensor-core dots with float32 accumulation give ~16 mantissa bits on that operand while
  the other operand (H, already half precision) is exact.
* PREC (everything else): a float32 dot with ``input_precision`` "ieee" (float32 inputs, or
  the interpreter) or "tf32x3" (three TF32 tensor-core passes, ~float32 accurate).

The interpreter of Triton 3.9 computes bf16 dots wrongly (design.md §6); the host code never
selects SPLIT for bf16 under the interpreter, which is the "upcast under the interpreter"
switch of the design. float16 SPLIT is right there and is what the CPU tests exercise.
"""
import os

import triton
import triton.language as tl

# Triton runs kernels in its CPU interpreter (read once, as triton itself does at import).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _half_dot(a, b):
    """a·b of two half-precision tiles with float32 accumulation."""
    if INTERPRETED and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, out_dtype=tl.float32)


@triton.jit
def dot_hf(h, w, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """h [M, K] in the hidden dtype times w [K, N] float32 -> float32 [M, N]."""
    if SPLIT:
        w_hi = w.to(h.dtype)
        w_lo = (w - w_hi.to(tl.float32)).to(h.dtype)
        return _half_dot(h, w_hi) + _half_dot(h, w_lo)
    else:
        return tl.dot(h.to(tl.float32), w, input_precision=PREC)


@triton.jit
def dot_fh(w, h, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """w [M, K] float32 times h [K, N] in the hidden dtype -> float32 [M, N]."""
    if SPLIT:
        w_hi = w.to(h.dtype)
        w_lo = (w - w_hi.to(tl.float32)).to(h.dtype)
        return _half_dot(w_hi, h) + _half_dot(w_lo, h)
    else:
        return tl.dot(w, h.to(tl.float32), input_precision=PREC)


@triton.jit
def dot_ff(a, b, PREC: tl.constexpr):
    """float32 [M, K] times float32 [K, N] -> float32 [M, N] at precision PREC."""
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def cast_for(x, ptr):
    """float32 x converted to the element type of ``ptr``, rounding to nearest even.

    The Triton 3.9 interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest
    even): a 1-ulp bias the tests would see. Under the interpreter bf16 is rounded by hand.
    """
    if INTERPRETED and ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def row_adapter(ids_ptr, row, HAS_IDS: tl.constexpr):
    """The adapter id (int64) of batch row ``row``: ids[row], or 0 with a single adapter (no ids)."""
    if HAS_IDS:
        a = tl.load(ids_ptr + row).to(tl.int64)
    else:
        a = row * 0
    return a

"""Compile every kernel launch the host code can make, for NVIDIA targets, without a GPU.

The Triton interpreter accepts programs the GPU compiler rejects (tl.dot shapes, dtype mixes,
bf16 atomics; design.md §6), so the CPU test suite also compiles exactly what the host code
launches: the launches are recorded (kernels.launch.record_launches) for a set of problems
covering every dtype, block configuration and switch, deduplicated, and handed to
triton.compile for sm_90 (and sm_80). Run it without TRITON_INTERPRET (the interpreter
replaces kernels by Python functions that cannot be compiled):

    python -m iapt_fast.kernels.compile_check [--arch 90 80] [--level quick|ci|full] [--only NAME ...] [--json]

Prints one line per compiled kernel variant (or a JSON list) with its shared memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HOPPER_SHARED_LIMIT = 227 * 1024
AMPERE_SHARED_LIMIT = 163 * 1024


def _problem(hidden_dtype, weight_dtype, dim, bottleneck, tokens, adapters, degrees, version,
             hidden_grad=True, seq=40, batch=2, anchored=False):
    from iapt_fast.generator.inputs import random_inputs

    inp = random_inputs(batch, seq, dim, bottleneck, tokens, adapters, degrees, dtype=hidden_dtype,
                        weight_dtype=weight_dtype, anchored=anchored, requires_grad=True)
    inp.hidden.requires_grad_(hidden_grad)
    weights = [inp.weights[w] for w in ("w_down", "w_pool", "rat_num", "rat_den", "w_up")]
    anchor = {k: inp.weights[k] for k in ("anchor", "anchor_scale") if k in inp.weights}
    return inp.hidden, inp.mask, weights, inp.adapter_ids, version, anchor


LEVELS = ("quick", "ci", "full")


def problems(level: str = "ci"):
    """(label, problem) pairs. "quick": the realistic shape (d=4096, m=320, T=4, degrees (6, 5))
    in every dtype with adapter ids, and bf16 without ids and without split-K; "ci": plus
    the smallest BLOCK_D with the largest T (16) and rational version A; "full": every dtype ×
    every BLOCK_D × several T, both versions, mixed weight dtypes, frozen hidden."""
    import torch

    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    real = dict(dim=4096, bottleneck=320, tokens=4, degrees=(6, 5))
    out = [(f"{dt} A=3 d=4096 m=320 T=4 B", _problem(dt, dt, adapters=3, version="B", **real)) for dt in (bf16, f16, f32)]
    out += [(f"{dt} A=3 d=4096 m=320 T=4 B anchored", _problem(dt, dt, adapters=3, version="B", anchored=True, **real))
            for dt in (bf16, f16, f32)]
    out.append(("bf16 + f32 weights A=1 anchored", _problem(bf16, f32, adapters=1, version="B", anchored=True, **real)))
    # batch 256: enough line tiles that the head GEMMs do not split K (the non-atomic variant).
    out.append(("bf16 A=1 B=256 (no ids)", _problem(bf16, bf16, adapters=1, version="B", batch=256, seq=4, **real)))
    if level == "quick":
        return out
    out.append(("bf16 d=16 T=16 A", _problem(bf16, bf16, 16, 24, 16, 3, (3, 2), "A")))
    out.append(("f32 d=16 T=16 A anchored", _problem(f32, f32, 16, 24, 16, 3, (3, 2), "A", anchored=True)))
    if level == "ci":
        return out
    for dt in (f16, f32):
        out.append((f"{dt} A=1 B=256", _problem(dt, dt, adapters=1, version="B", batch=256, seq=4, **real)))
    out.append(("bf16 + f32 weights, version A", _problem(bf16, f32, adapters=3, version="A", **real)))
    out.append(("bf16 + f32 weights, version A", _problem(bf16, f32, adapters=3, version="A", **real)))
    out.append(("f32 + bf16 weights, frozen hidden", _problem(f32, bf16, adapters=3, version="B", hidden_grad=False, **real)))
    out.append(("f16 + f32 weights", _problem(f16, f32, adapters=3, version="B", **real)))
    for dt in (bf16, f16, f32):
        for dim, tokens in ((16, 1), (32, 2), (64, 8), (96, 16)):
            out.append((f"{dt} d={dim} T={tokens}", _problem(dt, dt, dim, 24, tokens, 3, (3, 2), "A")))
    return out


def record_all(level: str = "ci"):
    """Deduplicated LaunchSpecs of forward + backward (training) and of the one-launch inference
    forward over ``problems``."""
    import torch

    from iapt_fast.kernels import record_launches, triton_prompt_generator
    from iapt_fast.kernels.launch import TP_DOT
    from iapt_fast.generator.weights import GeneratorWeights

    seen = {}
    for label, (hidden, mask, weights, ids, version, anchor) in problems(level):
        gen_weights = GeneratorWeights(*weights, **anchor)
        with record_launches() as specs:
            out = triton_prompt_generator(hidden, mask, gen_weights, ids, version)
            out.backward(torch.ones_like(out))
            with torch.no_grad():
                products = torch.zeros(weights[0].shape[0], weights[0].shape[1], TP_DOT)
                triton_prompt_generator(hidden, mask, gen_weights, ids, version, weight_products=products, fused=True)
        for spec in specs:
            key = (spec.name, tuple(sorted(spec.signature.items())), tuple(sorted(spec.constexprs.items())), spec.num_warps)
            seen.setdefault(key, (spec, label))
    return list(seen.values())


def make_source(spec):
    """ASTSource for a LaunchSpec; keyword names differ across triton versions."""
    from triton.compiler import ASTSource

    try:
        return ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
    except TypeError:  # older triton: constants= and a signature without constexpr entries
        sig = {k: v for k, v in spec.signature.items() if v != "constexpr"}
        return ASTSource(fn=spec.kernel, signature=sig, constants=spec.constexprs)


def compile_all(archs=(90,), level: str = "ci", log=None, only=None):
    """Compile every recorded launch (of the kernels named in ``only``, when given) for each
    arch. Returns a list of result dicts."""
    import triton
    from triton.backends.compiler import GPUTarget

    results = []
    for spec, label in record_all(level):
        if only and spec.name not in only:
            continue
        for arch in archs:
            start = time.time()
            compiled = triton.compile(make_source(spec), target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": spec.num_warps})
            ptx = compiled.asm.get("ptx", "")
            res = {
                "kernel": spec.name, "arch": arch, "problem": label,
                "constexprs": {k: str(v) for k, v in spec.constexprs.items()},
                "signature": {k: v for k, v in spec.signature.items() if v != "constexpr"},
                "shared": int(compiled.metadata.shared), "num_warps": spec.num_warps,
                "has_cubin": bool(compiled.asm.get("cubin")), "tensor_cores": ("mma" in ptx),
                "acq_rel_atomic": ".acq_rel." in ptx,
                "seconds": round(time.time() - start, 2),
            }
            results.append(res)
            if log is not None:
                log(f"sm_{arch} {spec.name:24s} shared={res['shared']:6d} tc={res['tensor_cores']!s:5s} "
                    f"{res['seconds']:.1f}s  {res['constexprs']}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--level", choices=LEVELS, default="ci", help="which problems' launches to compile")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="compile only these kernels")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of lines")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    results = compile_all(tuple(args.arch), args.level, log=None if args.json else lambda line: print(line, flush=True),
                          only=args.only)
    limits = {90: HOPPER_SHARED_LIMIT, 80: AMPERE_SHARED_LIMIT}
    over = [r for r in results if r["shared"] > limits.get(r["arch"], HOPPER_SHARED_LIMIT)]
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{len(results)} kernel variants compiled; {len(over)} over the shared-memory limit")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
